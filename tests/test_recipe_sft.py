"""The recipe's SFT task end to end on a tiny random Llama with a ChatML tokenizer: each TRL data
format through the command line, --task auto, completion-only labels, truncation counts,
evaluation (loss, perplexity, exact match), bf16 with compression and paging, a .gguf --model,
final/ reloading, resume and --compare with every peer."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from slimfit_accel import finetune, model_assets

from recipe_fixtures import write_table
from sft_fixtures import chat_tokenizer, tiny_llama

SMALL = ["--batch-size", "8", "--max-length", "32", "--lr", "1e-2", "--epochs", "1"]
FILLER = ["the", "movie", "a", "b", "c", "d"]


def reviews(n: int, seed: int) -> list[tuple[str, str]]:
    """(review words, answer): 'good' reviews are fresh, 'bad' ones rotten."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = i % 2 == 0
        words = [("good" if good else "bad")] * 2 + rng.choices(FILLER, k=rng.randint(1, 4))
        rng.shuffle(words)
        rows.append((" ".join(words), "fresh" if good else "rotten"))
    return rows


def rows_in(fmt: str, n: int, seed: int) -> list[dict]:
    out = []
    for review, answer in reviews(n, seed):
        question = f"review {review} what is the answer"
        if fmt == "messages":
            out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
        elif fmt == "prompt_completion":
            out.append({"prompt": question, "completion": f" {answer}"})
        elif fmt == "prompt_completion_messages":
            out.append({"prompt": [{"role": "user", "content": question}], "completion": [{"role": "assistant", "content": answer}]})
        else:
            out.append({"text": f"review {review} {answer}"})
    return out


def write_llama(folder: Path, template: bool = True) -> Path:
    tokenizer = chat_tokenizer() if template else chat_tokenizer(template=None)
    tiny_llama(len(tokenizer), tied=False, initializer_range=0.5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe-sft")
    out = {"llama": write_llama(root / "llama"), "root": root}
    for fmt in ("messages", "prompt_completion", "prompt_completion_messages", "text"):
        out[f"{fmt}_train"] = write_table(root / f"{fmt}_train.jsonl", rows_in(fmt, 48, seed=0))
        out[f"{fmt}_test"] = write_table(root / f"{fmt}_test.jsonl", rows_in(fmt, 16, seed=1))
    return out


def files(assets, fmt: str = "prompt_completion_messages") -> list[str]:
    return ["--train-file", str(assets[f"{fmt}_train"]), "--test-file", str(assets[f"{fmt}_test"])]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion", "prompt_completion_messages", "text"])
def test_each_format_trains_and_records_its_scores(assets, tmp_path, fmt):
    out = tmp_path / "out"
    task = ["--task", "sft"] if fmt == "text" else []  # the others are told apart by their columns (--task auto)
    generate = [] if fmt == "text" else ["--eval-generate", "6"]
    result = finetune.main(["--model", str(assets["llama"]), *files(assets, fmt), *SMALL, *task, *generate, "--output-dir", str(out)])
    written = summary(out)
    assert written["task"] == "sft" and written["data"]["format"] == ("text" if fmt == "text" else fmt.split("_messages")[0])
    assert written["steps"] == 6 and written["data"]["sizes"] == {"train": 48, "test": 16}
    assert written["eval_loss"] < written["eval_loss_before"]  # lr 1e-2: it learns within one epoch
    assert written["perplexity"] == pytest.approx(torch.tensor(written["eval_loss"]).exp().item())
    if fmt == "text":
        assert written["exact_match"] is None and written["generated"] == 0
    else:
        assert 0.0 <= written["exact_match"] <= 1.0 and written["generated"] == 6 and len(written["examples"]) == 3
        assert {"prompt", "reference", "generated"} <= set(written["examples"][0])
    assert written["epochs"][0]["eval_loss"] == written["eval_loss"] and "examples" not in written["epochs"][0]
    assert result["eval_tokens"] == written["data"]["counts"]["test"]["loss_tokens"]


def test_completion_only_by_default_and_every_token_with_train_on_prompt(assets):
    """Loss tokens per row: the answer and the end-of-turn token (2), or the whole rendered row."""
    args = [*SMALL, "--max-steps", "1", "--model", str(assets["llama"]), *files(assets, "messages")]
    only = finetune.main(args)
    every = finetune.main([*args, "--train-on-prompt"])
    assert only["eval_tokens"] == 16 * 2
    # '<|im_start|> user review ... <|im_end|> <|im_start|> assistant answer <|im_end|>': all but the first token
    lengths = [len(r.split()) + 12 for r, _ in reviews(16, seed=1)]
    assert every["eval_tokens"] == sum(lengths) - 16


def test_truncation_is_counted_printed_once_and_recorded(assets, tmp_path, capsys):
    """Prompts of 7-10 tokens (strings): at max_length 10, rows whose prompt leaves no room are
    skipped, rows with room for part of the completion are cut; both counted in summary.json."""
    out = tmp_path / "out"
    finetune.main(["--model", str(assets["llama"]), *files(assets, "prompt_completion"), *SMALL[:2], "--epochs", "1",
                   "--max-length", "9", "--output-dir", str(out)])
    counts = summary(out)["data"]["counts"]
    prompts = {"train": reviews(48, seed=0), "test": reviews(16, seed=1)}
    for split, rows in prompts.items():
        lengths = [len(r.split()) + 5 for r, _ in rows]  # 'review ... what is the answer'
        assert counts[split]["skipped_nothing_to_learn"] == sum(1 for n in lengths if n >= 9)  # the first answer token is past 9
        assert counts[split]["truncated_completions"] == sum(1 for n in lengths if n + 2 > 9)  # answer + eos cut
        assert counts[split]["kept"] == len(rows) - counts[split]["skipped_nothing_to_learn"]
    printed = capsys.readouterr().out
    assert printed.count("train: max_length 9 cut the completion of") == 1 and printed.count("test: max_length 9 cut") == 1


def test_final_model_reloads_with_its_tokenizer_and_scores_the_same(assets, tmp_path):
    from datasets import Dataset, DatasetDict
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimfit_accel.recipes.sft import SFTCollator, completion_loss, pad_token_id, tokenize_sft

    out = tmp_path / "out"
    written = finetune.main(["--model", str(assets["llama"]), *files(assets), *SMALL, "--output-dir", str(out)])
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert tokenizer.chat_template and model.config.use_cache is True  # the loaded config's own value, not training's
    test = Dataset.from_list([json.loads(line) for line in assets["prompt_completion_messages_test"].read_text().splitlines()])
    data = tokenize_sft(DatasetDict(test=test), tokenizer, max_length=32)
    scores = completion_loss(model, DataLoader(data.splits["test"], batch_size=16, collate_fn=SFTCollator(pad_token_id(tokenizer))))
    assert scores["eval_loss"] == pytest.approx(written["eval_loss"], abs=1e-5)


def test_bf16_with_the_default_slimfit_config(assets, tmp_path):
    """bf16 autocast on CPU with compression and optimizer paging (the packaged config): it trains."""
    out = tmp_path / "out"
    result = finetune.main(["--model", str(assets["llama"]), *files(assets), *SMALL, "--epochs", "2", "--mixed-precision", "bf16",
                            "--output-dir", str(out)])
    written = summary(out)
    assert finetune.default_slimfit_config("sft").endswith("sft.yaml")  # the decoder default, not the demo's
    packaged = yaml.safe_load(Path(finetune.default_slimfit_config("sft")).read_text())
    assert written["slimfit_config"]["scheduler"] == packaged["scheduler"]
    assert written["mixed_precision"] == "bf16" and written["slimfit_config"]["optimizer_paging"] is True
    assert written["slimfit_config"]["compression"] == "slimfit"
    assert result["eval_loss"] < result["eval_loss_before"] and result["steps"] == 12
    assert written["slimfit_config"]["checkpointing"] == packaged["checkpointing"] == {"blocks": 3, "input": "exact"}
    peak = written["memory"]["peak"]
    # both blocks of the tiny model are checkpointed (kept exact); the rest is compressed
    assert peak["activations_raw"] >= peak["activations"] > 0 and peak["optimizer_paged"] > 0
    compressed = {name: raw_stored for name, raw_stored in written["memory"]["by_compressor"].items() if name in ("int8", "int4")}
    assert compressed and all(stored < raw for raw, stored in compressed.values())
    # The next run in this process asks for Accelerate's default: it gets fp32, not the bf16 left behind.
    finetune.main(["--model", str(assets["llama"]), *files(assets), *SMALL, "--max-steps", "1", "--output-dir", str(tmp_path / "next")])
    assert summary(tmp_path / "next")["mixed_precision"] == "no"


def test_bf16_keeps_each_weight_once_in_bf16_with_fp32_masters_on_host_and_saves_the_masters(assets, tmp_path):
    """--mixed-precision bf16 with a config that pages the optimizer: master_weights: host (bf16
    weights on the device, half the fp32 bytes); final/ holds the fp32 masters, not their bf16
    copies. A config that sets master_weights itself (null) keeps fp32 weights."""
    from safetensors.torch import load_file

    masters, plain = tmp_path / "masters", tmp_path / "plain"
    config = tmp_path / "fp32_weights.yaml"
    config.write_text(Path(finetune.default_slimfit_config()).read_text() + "\nmaster_weights: null\n")
    common = ["--model", str(assets["llama"]), *files(assets), *SMALL, "--max-steps", "4", "--mixed-precision", "bf16"]
    finetune.main([*common, "--output-dir", str(masters)])
    finetune.main([*common, "--slimfit-config", str(config), "--output-dir", str(plain)])
    a, b = summary(masters), summary(plain)
    assert a["slimfit_config"]["master_weights"] == "host" and b["slimfit_config"]["master_weights"] is None
    assert a["memory"]["peak"]["params"] < 0.6 * b["memory"]["peak"]["params"]
    assert a["memory"]["peak"]["master_paged"] > 0 and a["eval_loss"] < a["eval_loss_before"]
    weights = load_file(masters / "final" / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert any(not torch.equal(w, w.bfloat16().float()) for w in weights.values())  # masters, not bf16 copies


def test_a_gguf_file_and_a_folder_holding_one_resolve_to_their_converted_folder(assets, tmp_path, monkeypatch):
    """``--model x.gguf`` goes through resolve_model: its cached conversion (here made in advance
    from the tiny model, so nothing converts) is what trains."""
    import shutil

    monkeypatch.setenv(model_assets.CACHE_ENV, str(tmp_path / "cache"))
    folder = tmp_path / "gguf"
    folder.mkdir()
    gguf = folder / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    shutil.copytree(assets["llama"], model_assets.cached_conversion(gguf))
    monkeypatch.setitem(sys.modules, "gguf", None)  # nothing to convert
    for spec in (gguf, folder):
        result = finetune.main(["--model", str(spec), *files(assets), *SMALL, "--max-steps", "2"])
        assert result["steps"] == 2 and result["task"] == "sft"


def _recipe(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "slimfit_accel.finetune", *args], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("precision", ["no", "bf16"], ids=["fp32", "bf16_masters_on_host"])
def test_resume_in_a_new_process_matches_an_uninterrupted_run(assets, tmp_path, precision):
    """Checkpoint at step 2 (mid-epoch, accumulating 2 batches a step), resume in another process:
    the same freeze sequence, per-epoch scores and weights, bit for bit (bf16: with the fp32
    masters on host the checkpoint carries)."""
    from safetensors.torch import load_file

    common = ["--model", str(assets["llama"]), *files(assets, "messages"), *SMALL[:-2], "--epochs", "2", "--grad-accum", "2",
              "--checkpointing-steps", "2", "--eval-generate", "4", "--mixed-precision", precision]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = _recipe([*common, "--output-dir", str(straight)])
    assert done.returncode == 0, done.stderr[-3000:]
    done = _recipe([*common, "--output-dir", str(resumed), "--resume-from-checkpoint", str(straight / "checkpoints" / "step_000002")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout

    a, b = summary(straight), summary(resumed)
    assert a["timeline"] == b["timeline"] and len(a["timeline"]) == 6
    assert a["epochs"] == b["epochs"] and a["exact_match"] == b["exact_match"] and a["examples"] == b["examples"]
    weights_a, weights_b = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert a["slimfit_config"]["master_weights"] == ("host" if precision == "bf16" else None)
    if precision == "bf16":
        return
    other = tmp_path / "other"  # loss on prompts too: other labels, so refused
    done = _recipe([*common, "--train-on-prompt", "--output-dir", str(other), "--resume-from-checkpoint", str(straight / "checkpoints" / "step_000002")])
    assert done.returncode == 2 and not other.exists()
    assert done.stderr.strip().splitlines()[-1].endswith("it was made with --train-on-prompt False, this run has True; resume with the same settings")


def test_compare_full_slimfit_lora_records_the_sft_scores_per_arm(assets, tmp_path):
    out = tmp_path / "compare"
    finetune.main(["--model", str(assets["llama"]), *files(assets), *SMALL, "--eval-generate", "6", "--compare", "full,slimfit,lora",
                   "--output-dir", str(out)])
    written = json.loads((out / "compare.json").read_text())
    assert written["task"] == "sft" and set(written["arms"]) == {"full", "slimfit", "lora"}
    for name, arm in written["arms"].items():
        for key in ("eval_loss", "perplexity", "exact_match", "eval_loss_before", "seconds_per_step", "memory"):
            assert arm[key] is not None, (name, key)
        assert arm["eval_loss"] < arm["eval_loss_before"], name
        assert arm["generated"] == 6
    arms = written["arms"]
    assert len({arm["eval_loss_before"] for arm in arms.values()}) == 1  # the same model, rows and seed
    assert arms["full"]["memory"]["peak"]["activations"] > arms["slimfit"]["memory"]["peak"]["activations"]
    assert arms["lora"]["memory"]["peak"]["optimizer"] < arms["full"]["memory"]["peak"]["optimizer"]
    table = (out / "compare.md").read_text()
    assert "| eval loss | perplexity | exact match |" in table and "| lora |" in table and "Before training: eval loss" in table
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "lora" / "final")  # adapters folded in: a plain model
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert not any("modules_to_save" in name for name, _ in merged.named_parameters())


def test_compare_in_bf16_gives_the_slimfit_arms_fp32_masters_on_host_and_full_accelerates_own(assets, tmp_path):
    """--compare under --mixed-precision bf16: the SlimFit arm (which pages) keeps bf16 weights with fp32
    masters on host; full fine-tuning is Accelerate's bf16 (fp32 weights); LISA (no paging) keeps fp32."""
    out = tmp_path / "compare"
    finetune.main(["--model", str(assets["llama"]), *files(assets), *SMALL, "--max-steps", "3", "--mixed-precision", "bf16",
                   "--compare", "full,slimfit,lisa", "--output-dir", str(out)])
    summaries = {arm: summary(out / arm) for arm in ("full", "slimfit", "lisa")}
    assert summaries["slimfit"]["slimfit_config"]["master_weights"] == "host"
    assert summaries["lisa"]["slimfit_config"]["master_weights"] is None and summaries["full"]["slimfit_config"] is None
    params = {arm: s["memory"]["peak"]["params"] for arm, s in summaries.items()}
    assert params["slimfit"] < 0.6 * params["full"] and params["lisa"] == params["full"]


def test_compare_badam_galore_and_lisa(assets, tmp_path):
    out = tmp_path / "compare"
    finetune.main(["--model", str(assets["llama"]), *files(assets), *SMALL, "--compare", "full,badam,galore,lisa",
                   "--output-dir", str(out)])
    arms = json.loads((out / "compare.json").read_text())["arms"]
    assert set(arms) == {"full", "badam", "galore", "lisa"}
    for name, arm in arms.items():
        assert arm["steps"] == 6 and arm["eval_loss"] < arm["eval_loss_before"], name
    # BAdam: Adam state of one block (plus its fp32 copy), not of the whole model
    assert arms["badam"]["memory"]["peak"]["optimizer"] < arms["full"]["memory"]["peak"]["optimizer"]
    assert arms["badam"]["memory"]["peak"]["grads"] < arms["full"]["memory"]["peak"]["grads"]


def test_a_missing_peer_package_is_one_line_before_any_arm_runs(assets, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "galore_torch", None)  # find_spec then answers None: not installed
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        finetune.cli(["--model", str(assets["llama"]), *files(assets), *SMALL, "--compare", "full,galore", "--output-dir", str(out)])
    assert exited.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("error: --compare galore needs the 'galore_torch' package, which is not installed: "
                                            "pip install 'slimfit-accel[bench]'")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet", "save_to_disk"])
def test_auto_picks_the_task_from_the_column_names(tmp_path, suffix):
    from datasets import Dataset

    def source(name: str, rows: list[dict]) -> list[str]:
        if suffix == "save_to_disk":
            Dataset.from_list(rows).save_to_disk(str(tmp_path / name))
            return ["--dataset", str(tmp_path / name)]
        return ["--train-file", str(write_table(tmp_path / f"{name}{suffix}", rows))]

    def chosen(argv: list[str]) -> str:
        return finetune.choose_task(finetune.parse_args(argv)).name

    sft = [{"prompt": "what is a", "completion": " b"}] * 4
    assert chosen(source("sft", sft)) == "sft"
    assert chosen(source("prompt_only", [{"prompt": "a"}] * 4)) == "sft"  # the SFT task then names the missing column
    assert chosen(source("reviews", [{"text": "good", "label": 1}] * 4)) == "classification"
    assert chosen(["--task", "sft", *source("text", [{"text": "a b"}] * 4)]) == "sft"
    assert chosen(["--task", "classification", *source("sft2", sft)]) == "classification"
