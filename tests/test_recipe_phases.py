"""The recipe's phases: setup, train_loop, finish, cleanup. A run leaves nothing behind: SlimFit
detached from the model, and under --compare each arm's model and optimizer released before the
next arm starts. Importing the recipe changes nothing in the environment."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from slimfit_accel import finetune
from slimfit_accel.recipes.classification import ClassificationTask

from recipe_fixtures import reviews, write_bert, write_table

SMALL = ["--batch-size", "8", "--max-length", "16", "--epochs", "1"]
TEXT = ["--text-column", "review", "--label-column", "sentiment"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe-phases")
    return {"bert": write_bert(root / "bert"), "csv": write_table(root / "reviews.csv", reviews(32))}


def _clean_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "TMPDIR", "LANG", "DS_ACCELERATOR", "OMP_NUM_THREADS")
    return {k: os.environ[k] for k in keep if k in os.environ}


def test_importing_the_recipe_leaves_the_hub_settings_alone_and_the_command_line_goes_offline():
    code = ("import os, huggingface_hub.constants as c, datasets.config as d, slimfit_accel.finetune as f; "
            "print(os.environ.get('HF_HUB_OFFLINE'), c.is_offline_mode(), d.HF_HUB_OFFLINE); "
            "f.offline_by_default(); print(os.environ.get('HF_HUB_OFFLINE'), c.is_offline_mode(), d.HF_HUB_OFFLINE)")
    done = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    imported, command_line = done.stdout.splitlines()
    assert imported.split() == ["None", "False", "False"]
    assert command_line.split() == ["1", "True", "True"]  # what cli() does first


def test_the_command_line_keeps_the_users_hub_setting():
    code = "import slimfit_accel.finetune as f, huggingface_hub.constants as c; f.offline_by_default(); print(c.is_offline_mode())"
    done = subprocess.run([sys.executable, "-c", code], env={**_clean_env(), "HF_HUB_OFFLINE": "0"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["False"], done.stderr[-2000:]


def test_cleanup_detaches_slimfit_from_the_model(assets):
    args = finetune.parse_args(["--model", str(assets["bert"]), "--train-file", str(assets["csv"]), *TEXT, *SMALL, "--max-steps", "2"])
    task = ClassificationTask()
    accelerator = finetune.build_accelerator(args.grad_accum, find_unused_parameters=True)
    inputs = task.load_inputs(args, str(assets["bert"]))
    slimfit = finetune.SlimFit.from_config(finetune.default_slimfit_config())
    run = finetune.setup(args, task, inputs, accelerator, slimfit)
    model = accelerator.unwrap_model(run.model)
    finetune.train_loop(run)
    assert run.steps == 2
    finetune.finish(run)
    hooked = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    hooked += sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())
    assert hooked and slimfit.controller is not None  # attached until cleanup: the checks below can fail
    finetune.cleanup(run)
    assert all(p.requires_grad for p in model.parameters())
    assert slimfit.controller is None and slimfit.memory is None and slimfit.compression is None
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert "forward" not in module.__dict__, name  # no swapped or checkpointed forward left
    for name, param in model.named_parameters():
        assert not getattr(param, "_post_accumulate_grad_hooks", None), name
    assert run.model is None and run.optimizer is None and run.slimfit is None


class RecordingTask(ClassificationTask):
    """The classification task, keeping weak references to each model it builds."""

    def __init__(self):
        self.models: list[weakref.ref] = []
        self.params: list[weakref.ref] = []
        self.alive_when_next_arm_started: list[int] = []

    def build_model(self, inputs):
        gc.collect()
        self.alive_when_next_arm_started.append(sum(ref() is not None for ref in self.models + self.params))
        model = super().build_model(inputs)
        self.models.append(weakref.ref(model))
        self.params.append(weakref.ref(next(model.parameters())))  # the optimizer's state and param groups hold these
        return model


def test_compare_releases_each_arms_model_and_optimizer_before_the_next(assets, tmp_path):
    task = RecordingTask()
    finetune.main(["--model", str(assets["bert"]), "--train-file", str(assets["csv"]), *TEXT, *SMALL, "--max-steps", "2",
                   "--compare", "slimfit,full,freeze_only", "--output-dir", str(tmp_path / "compare")], task=task)
    gc.collect()
    assert task.alive_when_next_arm_started == [0, 0, 0]
    assert all(ref() is None for ref in task.models + task.params)
