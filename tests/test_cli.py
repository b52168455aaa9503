"""``slimfit-accel``: --version, plugins piped into head, check-config's first decision on real units."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from slimfit_accel import __version__
from slimfit_accel.cli import main

from recipe_fixtures import write_bert, write_gpt2, write_vit

CLI = str(Path(sys.executable).with_name("slimfit-accel"))


def test_version():
    done = subprocess.run([CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == f"slimfit-accel {__version__}"


def test_plugins_json_piped_into_head_has_no_broken_pipe():
    done = subprocess.run(f"'{CLI}' plugins --json | head -n 2", shell=True, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert len(done.stdout.splitlines()) == 2
    assert "BrokenPipe" not in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-models")
    return {"bert": write_bert(root / "bert"), "gpt2": write_gpt2(root / "gpt2"), "vit": write_vit(root / "vit")}


@pytest.mark.parametrize("packaged_name", ["demo.yaml", "sft.yaml"])
@pytest.mark.parametrize("model", ["bert", "gpt2", "vit"])
def test_check_config_makes_the_first_decision_on_the_models_units(models, model, packaged_name, capsys):
    packaged = str(Path(__file__).resolve().parents[1] / "slimfit_accel" / "configs" / packaged_name)
    assert main(["check-config", packaged, "--model", str(models[model])]) == 0
    out = capsys.readouterr().out
    assert "1 always-trained units" in out  # the symbolic head: classifier, or GPT-2's score
    assert "step 0 trains" in out


def test_check_config_catches_a_static_pattern_that_matches_nothing(models, tmp_path, capsys):
    config = tmp_path / "static.yaml"
    config.write_text("units: {always_train: [head]}\nscheduler: {name: static, train: ['*.layer.99.*']}\n")
    assert main(["check-config", str(config), "--model", str(models["bert"])]) == 2
    err = capsys.readouterr().err
    assert "pattern '*.layer.99.*' matches no unit" in err and len(err.strip().splitlines()) == 1


def test_check_config_names_units_the_scheduler_can_never_pick(models, tmp_path, capsys):
    config = tmp_path / "tight.yaml"
    config.write_text("scheduler: {name: ils, freeze_ratio: 0.95, budget: parameters}\n")
    assert main(["check-config", str(config), "--model", str(models["bert"])]) == 0
    out = capsys.readouterr().out
    assert "the scheduler can never pick, which keep their loaded weights: bert.embeddings.position_embeddings.weight" in out
    roomy = tmp_path / "roomy.yaml"
    roomy.write_text("scheduler: {name: ils, freeze_ratio: 0.5, budget: parameters}\n")
    assert main(["check-config", str(roomy), "--model", str(models["bert"])]) == 0
    assert "never pick" not in capsys.readouterr().out


def test_check_config_task_override(models, capsys):
    packaged = str(Path(__file__).resolve().parents[1] / "slimfit_accel" / "configs" / "demo.yaml")
    assert main(["check-config", packaged, "--model", str(models["vit"]), "--task", "image"]) == 0
    assert "ViTForImageClassification" in capsys.readouterr().out


def test_packaged_config_gives_each_packaged_yaml_and_refuses_other_names():
    from slimfit_accel import load_config
    from slimfit_accel.configs import packaged_config

    assert load_config(packaged_config("sft")).scheduler.model_dump()["age_exponent"] == 1.5
    assert "age_exponent" not in load_config(packaged_config("demo")).scheduler.model_dump()
    with pytest.raises(ValueError, match="no packaged SlimFit config 'llama'; packaged: demo, sft"):
        packaged_config("llama")


@pytest.mark.parametrize("name", ["demo", "sft"])
@pytest.mark.parametrize("extra", [{}, {"optimizer_paging": False, "checkpointing": None}, {"optimizer_step": "in_backward", "paging_chunk_mib": 4}])
def test_a_config_dumped_whole_loads_back_as_the_same(name, extra):
    """Checkpoints and the Trainer's resume store ``model_dump()`` (every default written out): a
    validator that refuses a default value it did not see set would break them."""
    import yaml

    from slimfit_accel import load_config
    from slimfit_accel.configs import packaged_config

    config = {**yaml.safe_load(open(packaged_config(name))), **extra}
    loaded = load_config(config)
    assert load_config(loaded.model_dump(mode="json")) == loaded


def test_the_command_line_tools_quiet_import_noise_and_the_library_does_not():
    """bitsandbytes' offline kernel-fetch warnings (peft imports it) are silenced by the CLIs only."""
    import subprocess
    import sys

    from slimfit_accel.quiet import IMPORT_NOISE_LOGGERS

    check = ("import logging, {module}; print(min(logging.getLogger(n).level for n in {names!r}))")
    levels = {}
    for module in ("slimfit_accel", "slimfit_accel.cli", "slimfit_accel.finetune"):
        out = subprocess.run([sys.executable, "-c", check.format(module=module, names=IMPORT_NOISE_LOGGERS)],
                             capture_output=True, text=True, check=True).stdout
        levels[module] = int(out.strip().splitlines()[-1])
    assert levels == {"slimfit_accel": 0, "slimfit_accel.cli": 40, "slimfit_accel.finetune": 40}
