"""Bad input fails before any training step, with a message that says what, where and what to do."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from slimfit_accel import ConfigError, IntegrationError, PluginError, SlimFit, hookimpl
from slimfit_accel.plugins import StrategyRegistry

from conftest import tiny_bert

CLI = [sys.executable, "-m", "slimfit_accel.cli"]


def write(tmp_path, text: str):
    path = tmp_path / "slimfit.yaml"
    path.write_text(text)
    return path


CONFIG_CASES = {
    "ratio_too_high": ("scheduler: {name: ils, freeze_ratio: 1.0}\n", r"slimfit.yaml: scheduler: invalid options for scheduler 'ils': freeze_ratio must be in \[0, 1\), got 1.0"),
    "ratio_negative": ("scheduler: {name: ils, freeze_ratio: -0.1}\n", r"freeze_ratio must be in \[0, 1\), got -0.1"),
    "ratio_wrong_type": ("scheduler: {name: ils, freeze_ratio: lots}\n", r"freeze_ratio: Input should be a valid number.*got 'lots'"),
    "unknown_scheduler": ("scheduler: {name: ilz}\n", r"slimfit.yaml: scheduler.name: unknown scheduler 'ilz'. Known schedulers: ils, progressive, random_layers, static"),
    "unknown_scorer": ("scorer: {name: magic}\n", r"scorer.name: unknown scorer 'magic'. Known scorers: grad_norm, random, weight_delta"),
    "unknown_option": ("scheduler: {name: ils, freeze_rate: 0.5}\n", r"unknown option\(s\) \['freeze_rate'\]; valid options: \['age_exponent', 'budget', 'freeze_ratio'\]"),
    "yaml_syntax": ("scheduler: {name: ils, freeze_ratio: 0.9\nscorer: x\n", r"slimfit.yaml:\d+:\d+: YAML syntax error"),
    "typo_top_level": ("schedular: {name: ils}\n", r"schedular: unknown key"),
    "wrong_granularity": ("units: {granularity: layer}\n", r"units.granularity: Input should be 'tensor', 'module' or 'block'"),
    "seed_not_int": ("seed: abc\n", r"seed: Input should be a valid integer"),
    "not_a_mapping": ("- ils\n", r"a SlimFit config is a mapping"),
    "missing_name": ("scheduler: {freeze_ratio: 0.9}\n", r"scheduler.name: Field required"),
    "bad_interval": ("scheduler: {name: random_layers, interval: 0}\n", r"interval must be at least 1, got 0"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_is_rejected_with_a_clear_message(tmp_path, case):
    text, message = CONFIG_CASES[case]
    with pytest.raises(ConfigError, match=message):
        SlimFit.from_config(write(tmp_path, text))


@pytest.mark.parametrize("case", ["ratio_too_high", "unknown_scheduler", "yaml_syntax", "typo_top_level"])
def test_cli_check_config_exits_nonzero_and_writes_nothing(tmp_path, case):
    text, message = CONFIG_CASES[case]
    path = write(tmp_path, text)
    before = sorted(os.listdir(tmp_path))
    done = subprocess.run([*CLI, "check-config", str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ")
    assert sorted(os.listdir(tmp_path)) == before


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        SlimFit.from_config(tmp_path / "absent.yaml")


def test_pattern_matching_no_unit_fails_at_prepare_model():
    slimfit = SlimFit.from_config({"units": {"always_train": ["head.*"]}})
    with pytest.raises(ConfigError, match=r"units.always_train: pattern 'head\.\*' matches no unit of BertForSequenceClassification"):
        slimfit.prepare_model(tiny_bert())


def test_cli_check_config_against_a_model_folder(tmp_path):
    model_dir = tmp_path / "model"
    tiny_bert().config.save_pretrained(model_dir)
    good = write(tmp_path, "units: {always_train: ['classifier.*']}\n")
    ok = subprocess.run([*CLI, "check-config", str(good), "--model", str(model_dir)], capture_output=True, text=True)
    assert ok.returncode == 0 and "21 schedulable and 1 always-trained units" in ok.stdout
    bad = write(tmp_path, "units: {always_train: ['head.*']}\n")
    failed = subprocess.run([*CLI, "check-config", str(bad), "--model", str(model_dir)], capture_output=True, text=True)
    assert failed.returncode == 2 and "matches no unit" in failed.stderr


# -- misbehaving plugins: the error names the plugin ------------------------------------------
class Misbehaving:
    """A plugin whose strategies misbehave in configurable ways."""

    def __init__(self, mode: str):
        self.__name__ = f"bad_{mode}"
        self.mode = mode

    @hookimpl
    def register_schedulers(self, register):
        mode = self.mode

        class Bad:
            def select(self, ctx):
                if mode == "raises":
                    raise RuntimeError("boom")
                if mode == "unknown_names":
                    return ["not.a.unit"]
                return [u.name for u in ctx.units]

        register("bad", Bad)

    @hookimpl
    def register_scorers(self, register):
        mode = self.mode

        class BadScorer:
            def before_step(self, views):
                return None

            def after_step(self, views, carried):
                if mode == "wrong_shape":
                    return torch.zeros(len(views) + 1)
                return torch.full((len(views),), float("nan"))

        register("bad_scorer", BadScorer)


def attach(mode: str):
    slimfit = SlimFit.from_config({"scheduler": {"name": "bad"}, "scorer": {"name": "bad_scorer"}}, plugins=[Misbehaving(mode)])
    model = slimfit.prepare_model(tiny_bert())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    slimfit.attach(None, model, optimizer)
    return slimfit, model, optimizer


@pytest.mark.parametrize("mode,message", [("raises", "raised at step 0: RuntimeError: boom"), ("unknown_names", r"returned unknown unit names at step 0: \['not.a.unit'\]")])
def test_scheduler_misbehaviour_is_caught_at_attach(mode, message):
    with pytest.raises(PluginError, match=rf"plugin 'bad_{mode}': scheduler 'bad' {message}"):
        attach(mode)


@pytest.mark.parametrize("mode,message", [("nan", "returned non-finite scores at step 0"), ("wrong_shape", r"must return a tensor of shape \(\d+,\)")])
def test_scorer_misbehaviour_names_the_plugin(mode, message):
    slimfit, model, optimizer = attach(mode)
    with slimfit.step():
        model(input_ids=torch.randint(0, 99, (2, 5)), labels=torch.tensor([0, 1])).loss.backward()
        with pytest.raises(PluginError, match=rf"plugin 'bad_{mode}': scorer 'bad_scorer' {message}"):
            optimizer.step()


def test_plugin_raising_at_registration_is_named():
    class Broken:
        __name__ = "broken_plugin"

        @hookimpl
        def register_scorers(self, register):
            raise ImportError("missing dependency xyz")

    with pytest.raises(PluginError, match="plugin 'broken_plugin': raised in register_scorers: ImportError: missing dependency xyz"):
        StrategyRegistry.load([Broken()])


def test_duplicate_strategy_name_is_named():
    class Clash:
        __name__ = "clash_plugin"

        @hookimpl
        def register_schedulers(self, register):
            register("ils", object)

    with pytest.raises(PluginError, match=r"plugin 'clash_plugin': \(passed in code\) registers scheduler 'ils', "
                                          r"already registered by plugin 'ils' \(built into slimfit-accel\)"):
        StrategyRegistry.load([Clash()])


def test_optimizer_built_before_prepare_model_is_rejected():
    # With the whole model candidate, prepare_model makes frozen weights trainable: an optimizer
    # built before it misses them.
    slimfit = SlimFit.from_config({"units": {"candidates": "all"}})
    model = tiny_bert()
    for p in model.parameters():
        p.requires_grad_(False)
    model.classifier.weight.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    slimfit.prepare_model(model)
    with pytest.raises(IntegrationError, match="unit parameters are not in the optimizer"):
        slimfit.attach(None, model, optimizer)


def test_attach_before_prepare_model_is_rejected():
    with pytest.raises(IntegrationError, match="prepare_model"):
        SlimFit.from_config({}).attach(None, tiny_bert(), None)
