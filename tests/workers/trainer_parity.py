"""The same training three ways, for the Trainer parity tests (single process and torchrun).

``accelerate_run``: the documented Accelerate loop. ``trainer_run``: ``transformers.Trainer`` with
``SlimFitCallback``, set up to do the same maths (sequential batches, constant learning rate, no
clipping, no weight decay, no dropout). Both return the freeze decision of every optimizer step
and the final weights.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from slimfit_accel import SlimFit, make_accelerator

CONFIG = {
    "seed": 3,
    "scheduler": {"name": "ils", "freeze_ratio": 0.7},
    "units": {"always_train": ["head"]},
    "compression": "slimfit",
}
BATCH, ACCUM, LR = 4, 2, 1e-2


def make_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def make_data(examples: int) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 99, (examples, 12), generator=generator)
    labels = torch.randint(0, 2, (examples,), generator=generator)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(examples)]


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def deepspeed_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": ACCUM, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
    }


def accelerate_run(data: list[dict], steps: int, deepspeed: dict | None = None):
    from accelerate.utils import DeepSpeedPlugin
    from transformers import default_data_collator

    slimfit = SlimFit.from_config(CONFIG)
    model = slimfit.prepare_model(make_model())
    plugin = DeepSpeedPlugin(hf_ds_config=dict(deepspeed)) if deepspeed else None
    accelerator = make_accelerator(gradient_accumulation_steps=ACCUM, deepspeed_plugin=plugin)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    loader = DataLoader(data, batch_size=BATCH, collate_fn=default_data_collator)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    slimfit.attach(accelerator, model, optimizer, total_steps=steps)
    decisions = []
    for micro, batch in enumerate(loader):
        with accelerator.accumulate(model), slimfit.step():
            if micro % ACCUM == 0:
                decisions.append(list(slimfit.controller.trainable))
            # For a model whose forward takes loss kwargs (model_accepts_loss_kwargs; BERT's does)
            # the Trainer takes the loss as already normalised: it does not average it over
            # micro-batches, and it multiplies it by the number of processes (average_tokens_
            # across_devices). A classification loss is a plain mean, so do the same here.
            loss = model(**batch).loss * (ACCUM * accelerator.num_processes)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    assert slimfit.controller.step == steps, (slimfit.controller.step, steps)
    slimfit.detach()
    return decisions, weights(accelerator.unwrap_model(model))


def trainer_run(
    data: list[dict], steps: int, output_dir: str, save_steps: int = 0, resume: str | None = None,
    restore_callbacks: bool = False, print_report: bool = False, deepspeed: dict | None = None,
):
    """Returns (decisions, weights, callback); ``resume``: a checkpoint folder to resume from.

    With ``deepspeed`` the Trainer uses the process group already set up (gloo, by the
    Accelerate run): without a GPU, its own set-up would leave each process alone.
    """
    from accelerate.state import AcceleratorState
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from slimfit_accel.integrations.trainer import SlimFitCallback

    slimfit_callback = SlimFitCallback(CONFIG, print_report=print_report)
    decisions = []

    class Recorder(TrainerCallback):
        # At step end the step's decision is still current, whatever the callbacks' order (a
        # callback restored from a checkpoint is moved to the end of the list).
        def on_step_end(self, args, state, control, **kwargs):
            decisions.append(list(slimfit_callback.slimfit.controller.trainable))

    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
        max_steps=steps, learning_rate=LR, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant",
        warmup_steps=0, optim="adamw_torch", train_sampling_strategy="sequential", use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None, report_to=[], logging_strategy="no", disable_tqdm=True,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, seed=0,
        dataloader_num_workers=0, restore_callback_states_from_checkpoint=restore_callbacks,
        deepspeed=deepspeed, accelerator_config={"use_configured_state": True} if deepspeed else None,
    )
    if deepspeed:
        AcceleratorState._reset_state()  # one DeepSpeed plugin per Accelerator state
    trainer = Trainer(model=make_model(), args=args, train_dataset=data, callbacks=[slimfit_callback, Recorder()])
    trainer.train(resume_from_checkpoint=resume)
    return decisions, weights(trainer.model), slimfit_callback


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)
