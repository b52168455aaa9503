"""transformers.Trainer + SlimFitCallback: the Accelerate loop's decisions and weights, checkpoints, PEFT."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import WORKERS, random_batch, tiny_bert

sys.path.insert(0, str(WORKERS))
from trainer_parity import accelerate_run, make_data, max_difference, trainer_run  # noqa: E402

STEPS = 6
DATA = make_data(BATCH_EXAMPLES := 48)  # 12 batches of 4, 2 micro-batches per optimizer step


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    decisions, weights, callback = trainer_run(DATA, STEPS, str(out), save_steps=3)
    return out, decisions, weights, callback


def test_trainer_makes_the_accelerate_loops_decisions_and_weights(straight):
    _, decisions, weights, callback = straight
    expected_decisions, expected_weights = accelerate_run(DATA, STEPS)
    assert decisions == expected_decisions
    assert len({tuple(d) for d in decisions}) > 1  # the decision really changed over steps
    assert max_difference(weights, expected_weights) <= 1e-6
    report = callback.report
    assert report.steps == STEPS and report.memory is not None
    assert 0 < report.memory.last.activations < report.memory.last.activations_raw  # compression on


def test_checkpoint_holds_the_slimfit_state(straight):
    out, *_ = straight
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["SlimFitCallback"]
    assert saved["args"]["config"]["seed"] == 3
    assert isinstance(saved["attributes"]["slimfit_state"], str)


@pytest.mark.parametrize("restore_callbacks", [False, True], ids=["default", "restore_callback_states"])
def test_resume_continues_the_same_freeze_sequence(straight, tmp_path, capsys, restore_callbacks):
    out, decisions, weights, _ = straight
    resumed, resumed_weights, callback = trainer_run(
        DATA, STEPS, str(tmp_path), resume=str(out / "checkpoint-3"), restore_callbacks=restore_callbacks,
        print_report=True,
    )
    assert resumed == decisions[3:]
    assert max_difference(resumed_weights, weights) <= 1e-6
    printed = capsys.readouterr().out
    assert "trainable params: " in printed and "SlimFit candidates: " in printed  # the summary, at start
    assert "SlimFit freezing" in printed  # the report, at the end


def test_resume_from_a_checkpoint_without_slimfit_state_is_refused(straight, tmp_path):
    from slimfit_accel import IntegrationError

    out, *_ = straight
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    for path in (out / "checkpoint-3").iterdir():
        (checkpoint / path.name).write_bytes(path.read_bytes())
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["stateful_callbacks"]["SlimFitCallback"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(IntegrationError, match="resume from a checkpoint saved with SlimFitCallback"):
        trainer_run(DATA, STEPS, str(tmp_path / "out"), resume=str(checkpoint))


def test_trainer_with_peft_trains_only_adapters_and_head(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import Trainer, TrainingArguments

    from slimfit_accel import SlimFitCallback

    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    batch = random_batch(batch=16)
    data = [{"input_ids": batch["input_ids"][i], "labels": batch["labels"][i]} for i in range(16)]
    callback = SlimFitCallback({"scheduler": {"name": "ils", "freeze_ratio": 0.5}, "units": {"always_train": ["*classifier*"]}})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, use_cpu=True,
                             report_to=[], logging_strategy="no", save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        if name in base:
            assert torch.equal(param.detach(), base[name]) and not param.requires_grad, name
            assert id(param) not in in_optimizer, name
    assert all(".lora_" in n or ".modules_to_save." in n for n in callback.report.trained_steps)
    assert callback.report.steps == 4


def test_ddp_without_find_unused_parameters_is_refused(monkeypatch):
    from types import SimpleNamespace

    import accelerate.state
    from accelerate.utils import DistributedType

    from slimfit_accel import IntegrationError
    from slimfit_accel.integrations.trainer import _check_ddp

    two = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU)
    monkeypatch.setattr(accelerate.state, "PartialState", lambda: two)
    with pytest.raises(IntegrationError, match="ddp_find_unused_parameters=True"):
        _check_ddp(SimpleNamespace(ddp_find_unused_parameters=False), tiny_bert())
    _check_ddp(SimpleNamespace(ddp_find_unused_parameters=None, activation_checkpointing=False), tiny_bert())
    checkpointed = tiny_bert()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(IntegrationError, match="use_reentrant"):
        _check_ddp(SimpleNamespace(ddp_find_unused_parameters=True), checkpointed)
