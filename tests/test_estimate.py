"""``slimfit-accel estimate``: the fake-tensor estimate equals the meter on a real run, arm by arm;
``--budget`` writes a config SlimFit loads and that fits; ``--json``; bad inputs fail in one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from slimfit_accel import SlimFit
from slimfit_accel import estimate as planner
from slimfit_accel.cli import main

CHECKED = ("weights", "optimizer", "optimizer_host", "weights_host", "meter_total")
# Saved activations depend on the units a step trains; once a tiny model has trained every unit that
# fits, the scheduler refills the budget by real score values, which fake tensors do not have, so
# the per-category activations may differ there while the steady total (bounded by the budget) agrees.


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=160, tie_word_embeddings=True, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("tiny-bert")
    BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64, architectures=["BertForSequenceClassification"]).save_pretrained(folder)
    return folder


def _fake_and_real(setup: planner.Setup, arm: str):
    return planner.run_arm(setup, arm), planner.run_arm(dataclasses.replace(setup, fake=False), arm)


@pytest.mark.parametrize("arm", ["full", "full_pure_bf16", "full_checkpointing", "lora", "slimfit_default", "slimfit_best",
                                 "slimfit_8bit_frozen"])
def test_estimate_equals_the_meter_on_a_real_bf16_llama_run(llama_dir, arm):
    """Every arm the planner claims exact, within 3% of the meter's figures on real tensors
    (bf16 autocast; slimfit_best: paging, fp32 masters on host, chunked loss, checkpointing)."""
    setup = planner.Setup(llama_dir, seq_len=32, batch=2, precision="bf16", device="cpu").load()
    fake, real = _fake_and_real(setup, arm)
    assert real.meter_total > 0
    for key in CHECKED:
        assert getattr(fake, key) == pytest.approx(getattr(real, key), rel=0.03), key


@pytest.mark.parametrize("arm", ["full", "slimfit_default", "slimfit_best"])
def test_estimate_equals_the_meter_on_a_real_fp32_bert_run(bert_dir, arm):
    setup = planner.Setup(bert_dir, seq_len=16, batch=4, precision="fp32", device="cpu").load()
    fake, real = _fake_and_real(setup, arm)
    for key in CHECKED:
        assert getattr(fake, key) == pytest.approx(getattr(real, key), rel=0.03), key
    # best's input_embedding: auto: the word embeddings (99 x 32) exceed ILS's budget at 0.9, so on host
    assert (real.weights_host == 99 * 32 * 4) == (arm == "slimfit_best")


def test_the_ladder_chunks_the_loss_by_256_tokens_and_places_a_never_trained_embedding_on_host(llama_dir):
    setup = planner.Setup(llama_dir, seq_len=32, batch=2, precision="bf16").load()
    ladder = dict(planner.budget_ladder(setup))
    chunked = ladder["+ chunked loss, 256 tokens a chunk"]  # sft.yaml's auto (1024 tokens) made smaller, still auto
    assert chunked["chunked_loss"] == {"chunk_size": 256, "fallback": "standard"}
    stepped = ladder["+ optimizer step in backward, input_embedding: auto"]
    assert stepped["input_embedding"] == "auto" and stepped["optimizer_step"] == "in_backward"
    assert all(config["input_embedding"] == "auto" for config in list(ladder.values())[list(ladder).index(
        "+ optimizer step in backward, input_embedding: auto"):])
    small = dict(planner.budget_ladder(dataclasses.replace(setup, slimfit_config={"chunked_loss": {"chunk_size": 128}})))
    assert not any(rung.startswith("+ chunked loss") for rung in small)  # chunks no larger already: no rung


def test_budget_writes_a_config_that_slimfit_loads_and_that_fits(llama_dir, tmp_path, capsys):
    out = tmp_path / "fit.yaml"
    setup = planner.Setup(llama_dir, seq_len=32, batch=2, precision="bf16").load()
    base = planner.run_arm(setup, "slimfit_default").device_total
    budget = base + planner.CUDA_RESERVE - 1  # the base config just misses: a later rung is chosen
    assert main(["estimate", "--model", str(llama_dir), "--seq-len", "32", "--batch", "2", "--budget", str(budget),
                 "--write-config", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rule:" in printed and "wrote" in printed
    config = yaml.safe_load(out.read_text())
    SlimFit.from_config(str(out))  # loads
    assert config != setup.base_slimfit()
    chosen = planner.run_arm(setup, "budget", builder=lambda s: planner.slimfit_arm(s, config))
    assert chosen.device_total + planner.CUDA_RESERVE <= budget
    # a budget the default fits as the recipe runs it in bf16 (fp32 masters on host) keeps it
    choice = planner.fit_budget(setup, base + planner.CUDA_RESERVE)
    assert choice.rung == "the base config" and choice.config == planner.slimfit_default_config(setup)
    assert choice.config["master_weights"] == "host" and choice.config["checkpointing"]["blocks"] != "all"  # the default's own


def test_json_gives_every_arm_and_category(llama_dir, capsys):
    assert main(["estimate", "--model", str(llama_dir), "--seq-len", "16", "--batch", "1", "--precision", "fp32",
                 "--arms", "full", "slimfit_best", "slimfit_8bit_frozen", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in data["arms"]] == ["full", "slimfit_best", "slimfit_8bit_frozen"]
    assert all(arm["method"] == "fake-tensor run" for arm in data["arms"])  # frozen_weights: int8 runs too
    for arm in data["arms"]:
        assert set(planner.CATEGORY_LABELS) <= set(arm) and set(arm["fits"]) == {"12GB", "16GB", "24GB", "48GB"}
        assert arm["device_total"] == arm["meter_total"] + arm["working_set"]
    assert data["arms"][2]["weights"] < data["arms"][1]["weights"]
    # a causal LM's SlimFit arms start from the recipe's default for --task sft
    sft = yaml.safe_load((Path(planner.__file__).parent / "configs" / "sft.yaml").read_text())
    assert data["arms"][1]["slimfit_config"]["scheduler"] == {**sft["scheduler"], "freeze_ratio": 0.9}


def test_budget_below_the_bf16_weights_reaches_int8_frozen_weights(llama_dir):
    """The ladder's last resort before freeze ratio 0.98: frozen matrices in int8 (the weights'
    floor is then their int8 codes, so a budget under the bf16 weights is not refused)."""
    setup = planner.Setup(llama_dir, seq_len=32, batch=2, precision="bf16").load()
    ladder = dict(planner.budget_ladder(setup))
    assert list(ladder)[-2:] == ["+ frozen weights in int8", "+ freeze_ratio 0.98"]
    int8 = ladder["+ frozen weights in int8"]
    assert int8["frozen_weights"] == "int8" and int8["scheduler"]["freeze_ratio"] == 0.95
    needed = planner.run_arm(setup, "budget", builder=lambda s: planner.slimfit_arm(s, int8)).device_total
    choice = planner.fit_budget(setup, needed + planner.CUDA_RESERVE)
    assert choice.rung == "+ frozen weights in int8"
    assert planner.weight_bytes(setup) < 0.6 * sum(p.numel() for p in setup.build_model().parameters()) * 2


def test_arms_in_worker_processes_give_the_same_figures(llama_dir):
    """``jobs``: each arm in its own process (the default on a multi-core machine) changes no byte."""
    setup = planner.Setup(llama_dir, seq_len=16, batch=2, precision="bf16", device="cpu").load()
    arms = ["full", "lora", "slimfit_default", "slimfit_best", "slimfit_8bit_frozen"]
    serial = planner.estimate(setup, arms, jobs=1)
    parallel = planner.estimate(setup, arms, jobs=2)
    assert [a.name for a in parallel] == arms
    assert [dataclasses.asdict(a) for a in parallel] == [dataclasses.asdict(a) for a in serial]


def test_jobs_below_one_is_one_line_exit_2(llama_dir, capsys):
    assert main(["estimate", "--model", str(llama_dir), "--seq-len", "16", "--batch", "1", "--jobs", "0"]) == 2
    err = capsys.readouterr().err
    assert "--jobs 0" in err and len(err.strip().splitlines()) == 1


def test_an_unknown_strategy_in_the_slimfit_config_fails_before_any_arm_runs(llama_dir, tmp_path, capsys, monkeypatch):
    config = tmp_path / "mine.yaml"
    config.write_text("scheduler: {name: ilz, freeze_ratio: 0.8}\n")
    monkeypatch.setattr(planner, "run_arm", lambda *a, **k: pytest.fail("an arm ran"))
    assert main(["estimate", "--model", str(llama_dir), "--seq-len", "16", "--batch", "1", "--slimfit-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "mine.yaml" in err and "unknown scheduler 'ilz'" in err


def test_plugin_errors_survive_the_trip_back_from_a_worker():
    import pickle

    from slimfit_accel.errors import PluginError

    err = pickle.loads(pickle.dumps(PluginError("my-plugin", "scores had the wrong shape")))
    assert isinstance(err, PluginError) and err.plugin == "my-plugin" and "my-plugin" in str(err)


def test_a_folder_without_config_json_is_one_line_exit_2(tmp_path, capsys):
    assert main(["estimate", "--model", str(tmp_path), "--seq-len", "16", "--batch", "1"]) == 2
    err = capsys.readouterr().err
    assert "no config.json there" in err and len(err.strip().splitlines()) == 1


def test_a_budget_without_its_unit_is_one_line_exit_2(llama_dir, capsys):
    """``--budget 24`` is a GPU size missing its unit, not 24 bytes."""
    assert main(["estimate", "--model", str(llama_dir), "--seq-len", "16", "--batch", "1", "--budget", "24"]) == 2
    err = capsys.readouterr().err
    assert "no unit" in err and "24GiB" in err and len(err.strip().splitlines()) == 1


def test_a_budget_below_the_weights_is_one_line_exit_2(llama_dir, capsys):
    assert main(["estimate", "--model", str(llama_dir), "--seq-len", "16", "--batch", "1", "--budget", "1KiB"]) == 2
    err = capsys.readouterr().err
    assert "the weights alone take" in err and len(err.strip().splitlines()) == 1


def test_the_llama_3_8b_config_is_committed():
    config = json.loads((Path(planner.__file__).parent / "configs" / "models" / "llama-3-8b" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"], config["vocab_size"]) == (4096, 32, 8, 128256)


def test_8bit_frozen_weights_are_the_meters_codes_scales_and_worst_trained_copies(llama_dir):
    """``slimfit_8bit_frozen`` runs ``frozen_weights: int8``: its weights are, exactly on fake and real
    tensors, the meter's between-steps bytes (int8 codes + fp32 row scales of every stored matrix, the
    rest in bf16) plus bf16 copies of the most a step can train (``worst_case_weights``)."""
    setup = planner.Setup(llama_dir, seq_len=32, batch=2, precision="bf16", device="cpu").load()
    fake, real = _fake_and_real(setup, "slimfit_8bit_frozen")
    best = planner.run_arm(setup, "slimfit_best")
    assert fake.weights == real.weights and fake.meter_total == real.meter_total
    assert real.weights < 0.7 * best.weights and real.meter_total < best.meter_total


def _cut_llama_3_8b(folder: Path, blocks: int) -> planner.Setup:
    config = json.loads((Path(planner.__file__).parent / "configs" / "models" / "llama-3-8b" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": blocks}))
    return planner.Setup(folder, seq_len=2048, batch=2, precision="bf16", device="cpu").load()


def test_a_step_that_trains_the_output_side_is_part_of_the_estimate(tmp_path, monkeypatch):
    """The gradients of an LM head and the last blocks come first in backward, while nearly every
    activation is still saved. Drawn steps may never train them together; the estimate adds one
    step that does (``first_gradients_draw``), so its total covers such a draw. Llama-3-8B's
    geometry cut to 8 and 4 blocks (fake tensors: no memory used)."""
    (tmp_path / "8").mkdir()
    with planner.shape_only():  # as run_arm builds it: fake tensors
        arm = planner.ARM_BUILDERS["slimfit_default"](_cut_llama_3_8b(tmp_path / "8", 8))
        first = planner.first_gradients_draw(arm.slimfit)
        units = {u.name: u.numel for u in arm.slimfit.units.schedulable}
        budget = arm.slimfit.controller.scheduler.strategy.step_budget(list(units.values()))
        arm.cleanup()
    # from the output side: the head, then the last block's matrices that still fit the budget
    assert "lm_head.weight" in first and "model.embed_tokens.weight" not in first
    assert "model.layers.7.self_attn.o_proj.weight" in first and "model.layers.0.self_attn.o_proj.weight" not in first
    assert sum(units[name] for name in first) <= budget
    # 4 blocks (the head is then larger than the budget): the last blocks' gradients alone raise the peak
    setup = _cut_llama_3_8b(tmp_path, 4)
    with_step = planner.run_arm(setup, "slimfit_default")
    monkeypatch.setattr(planner, "first_gradients_draw", lambda slimfit: None)
    drawn_only = planner.run_arm(setup, "slimfit_default")
    assert with_step.meter_total > drawn_only.meter_total * 1.02, (with_step.meter_total, drawn_only.meter_total)


def test_in_backward_a_step_is_bounded_by_two_units_gradients_and_one_chunk(llama_dir):
    """``slimfit_best`` steps in backward: the bound adds to the measured peak the two largest units'
    gradients (one waiting for the next gradient hook, one arriving) and one chunk's state, not the
    whole step's gradients; a real run's meter never saw more gradient bytes than that."""
    setup = planner.Setup(llama_dir, seq_len=32, batch=2, precision="bf16", device="cpu").load()
    arm = planner.ARM_BUILDERS["slimfit_best"](setup)
    assert arm.slimfit.config.optimizer_step == "in_backward"
    grads, chunk = planner.worst_case_step(arm.slimfit, arm.optimizer, cuda=False)
    sizes = sorted((sum(p.numel() * p.element_size() for p in u.params) for u in arm.slimfit.units.all), reverse=True)
    budget = arm.slimfit.controller.scheduler.strategy.step_budget([u.numel for u in arm.slimfit.units.schedulable]) * 2
    arm.cleanup()
    assert grads == min(sizes[0] + sizes[1], budget) and 0 < chunk <= 4 * 2 * grads + 64
    real = planner.run_arm(dataclasses.replace(setup, fake=False), "slimfit_best")
    assert real.gradients == grads  # the largest of the measured peak and the bound


def test_decide_next_trains_the_given_units_and_refuses_unknown_names(llama_dir):
    setup = planner.Setup(llama_dir, seq_len=16, batch=2, precision="fp32", device="cpu").load()
    arm = planner.ARM_BUILDERS["slimfit_default"](setup)
    controller = arm.slimfit.controller
    with pytest.raises(ValueError, match="unknown unit names"):
        controller.decide_next({"no.such.weight"})
    chosen = {controller.units.schedulable[-1].name}
    controller.decide_next(chosen)
    controller.begin_step()
    assert set(controller.trainable) == chosen
    arm.cleanup()
