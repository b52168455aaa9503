"""The recipe end to end on tiny random models: a user's CSV, JSONL, images, a GPT-2 without a
pad token, resume, the final model, and --compare. The real MiniLM runs in test_end_to_end.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimfit_accel import finetune

from recipe_fixtures import reviews, write_bert, write_gpt2, write_images, write_table, write_vit

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--batch-size", "8", "--max-length", "16", "--lr", "1e-3"]
TEXT = ["--text-column", "review", "--label-column", "sentiment"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe")
    return {
        "bert": write_bert(root / "bert"),
        "gpt2": write_gpt2(root / "gpt2"),
        "vit": write_vit(root / "vit"),
        "images": write_images(root / "images"),
        "train_csv": write_table(root / "train.csv", reviews(48)),
        "test_csv": write_table(root / "test.csv", reviews(16, seed=1)),
        "jsonl": write_table(root / "all.jsonl", reviews(60, seed=2)),
    }


def test_csv_by_path_with_string_labels(assets, tmp_path):
    out = tmp_path / "out"
    result = finetune.main(["--model", str(assets["bert"]), "--train-file", str(assets["train_csv"]), "--test-file",
                            str(assets["test_csv"]), *TEXT, *SMALL, "--epochs", "2", "--output-dir", str(out)])
    for key in ("accuracy_before", "accuracy_after", "macro_f1", "steps", "seconds_per_step", "report"):
        assert key in result
    assert result["steps"] == 12 and len(result["epochs"]) == 2
    assert result["majority_baseline"]["accuracy"] == 0.5  # 8 pos / 8 neg in test.csv
    assert json.loads((out / "labels.json").read_text()) == {"0": "neg", "1": "pos"}  # sorted strings -> ids
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["labels"] == ["neg", "pos"] and summary["versions"]["torch"]
    assert summary["memory"]["peak"]["activations_raw"] > summary["memory"]["peak"]["activations"] > 0
    assert summary["freeze"]["scheduler"] == "ils" and summary["slimfit_config"]["units"]["always_train"] == ["head"]
    assert (out / "final" / "config.json").is_file() and (out / "final" / "tokenizer.json").is_file()


def test_jsonl_with_a_held_out_fraction(assets):
    result = finetune.main(["--model", str(assets["bert"]), "--train-file", str(assets["jsonl"]), "--test-fraction", "0.25",
                            *TEXT, *SMALL, "--epochs", "1"])
    assert result["steps"] == 6  # 45 training rows in batches of 8
    assert 0.0 <= result["macro_f1"] <= 1.0


def test_image_classification_with_a_tiny_vit(assets, tmp_path):
    out = tmp_path / "out"
    result = finetune.main(["--model", str(assets["vit"]), "--dataset", str(assets["images"]), "--test-fraction", "0.25",
                            *SMALL, "--epochs", "2", "--output-dir", str(out)])
    assert result["steps"] == 8 and result["report"]["always_trained_units"] == 1
    assert (out / "final" / "preprocessor_config.json").is_file()
    assert json.loads((out / "summary.json").read_text())["data"]["task"] == "image"


def test_gpt2_classifier_without_a_pad_token(assets, capsys):
    result = finetune.main(["--model", str(assets["gpt2"]), "--train-file", str(assets["train_csv"]), "--test-file",
                            str(assets["test_csv"]), *TEXT, *SMALL, "--epochs", "1"])
    assert "padding with its eos token '<eos>'" in capsys.readouterr().out
    assert result["steps"] == 6
    assert result["report"]["always_trained_units"] == 1  # the head is `score`, found for the model


def test_compare_full_and_slimfit_writes_table_json_and_pictures(assets, tmp_path):
    from PIL import Image

    out = tmp_path / "compare"
    result = finetune.main(["--model", str(assets["bert"]), "--train-file", str(assets["train_csv"]), "--test-file",
                            str(assets["test_csv"]), *TEXT, *SMALL, "--epochs", "1", "--compare", "full,slimfit", "--output-dir", str(out)])
    assert set(result["arms"]) == {"full", "slimfit"}
    compared = json.loads((out / "compare.json").read_text())["arms"]
    full, slim = compared["full"]["memory"]["peak"], compared["slimfit"]["memory"]["peak"]
    assert full["params"] == slim["params"] and full["activations"] > slim["activations"]
    assert compared["full"]["accuracy_before"] == compared["slimfit"]["accuracy_before"]  # same model, split and seed
    table = (out / "compare.md").read_text()
    assert "| full |" in table and "| slimfit |" in table and "activations stored (raw)" in table
    for picture in ("freeze_timeline.png", "memory_breakdown.png"):
        image = Image.open(out / picture)
        image.verify()
        image = Image.open(out / picture).convert("L")
        assert image.size[0] > 400 and image.size[1] > 300
        assert len(set(image.getdata())) > 10  # drawn, not blank


def _recipe(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "slimfit_accel.finetune", *args], capture_output=True, text=True, timeout=600, env=env)


def test_resume_in_a_new_process_matches_an_uninterrupted_run(assets, tmp_path):
    """Checkpoint at step 2 (mid-epoch, accumulating 2 batches a step), resume in another process:
    same freeze sequence, same weights; OUTPUT/final loads with from_pretrained and reproduces the
    final accuracy."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    common = ["--model", str(assets["bert"]), "--train-file", str(assets["train_csv"]), "--test-file", str(assets["test_csv"]),
              *TEXT, *SMALL, "--epochs", "2", "--grad-accum", "2", "--checkpointing-steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = _recipe([*common, "--output-dir", str(straight)])
    assert done.returncode == 0, done.stderr[-3000:]
    done = _recipe([*common, "--output-dir", str(resumed), "--resume-from-checkpoint", str(straight / "checkpoints" / "step_000002")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout

    a, b = json.loads((straight / "summary.json").read_text()), json.loads((resumed / "summary.json").read_text())
    assert a["timeline"] == b["timeline"] and len(a["timeline"]) == 6
    assert a["epochs"] == b["epochs"]
    weights_a, weights_b = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert max((weights_a[k] - weights_b[k]).abs().max().item() for k in weights_a) <= 1e-6

    model = AutoModelForSequenceClassification.from_pretrained(straight / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(straight / "final")
    rows = reviews(16, seed=1)
    batch = tokenizer([r["review"] for r in rows], truncation=True, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    names = model.config.id2label
    accuracy = sum(names[p] == r["sentiment"] for p, r in zip(predicted, rows)) / len(rows)
    assert accuracy == pytest.approx(a["accuracy_after"])

    # Resuming with other settings would take other batches: refused, one line, nothing written.
    other = tmp_path / "other"
    done = _recipe([*common, "--batch-size", "4", "--output-dir", str(other), "--resume-from-checkpoint", str(straight / "checkpoints" / "step_000002")])
    assert done.returncode == 2 and not other.exists()
    assert done.stderr.strip().splitlines()[-1].endswith("it was made with --batch-size 8, this run has 4; resume with the same settings")


@pytest.mark.slow
def test_csv_under_accelerate_launch_with_zero2_on_two_processes(assets, tmp_path):
    out = tmp_path / "out"
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([str(accelerate), "launch", "--config_file", "accelerate_configs/zero2.yaml", "launch/finetune.py",
                           "--model", str(assets["bert"]), "--train-file", str(assets["train_csv"]), "--test-file", str(assets["test_csv"]),
                           *TEXT, *SMALL, "--epochs", "1", "--output-dir", str(out)],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "2 process(es)" in done.stdout and "trained 3 optimizer steps" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["data"]["sizes"] == {"train": 48, "test": 16}
    assert (out / "final" / "model.safetensors").is_file()


def _tensorboard_scalars(folder: Path) -> dict[str, list[float]]:
    """Scalars from TensorBoard event files (TFRecords of Event protos), read without TensorBoard."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[float]] = {}
    for path in folder.rglob("events.out.tfevents.*"):
        raw, at = path.read_bytes(), 0
        while at < len(raw):
            (length,) = struct.unpack("<Q", raw[at:at + 8])
            event = event_pb2.Event.FromString(raw[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


def test_report_to_tensorboard_logs_every_step_and_the_schedule(assets, tmp_path):
    pytest.importorskip("tensorboardX")
    out = tmp_path / "out"
    finetune.main(["--model", str(assets["bert"]), "--train-file", str(assets["train_csv"]), "--test-file", str(assets["test_csv"]),
                   *TEXT, *SMALL, "--epochs", "1", "--report-to", "tensorboard", "--output-dir", str(out),
                   "--lr-scheduler", "cosine", "--warmup-ratio", "0.5"])
    scalars = _tensorboard_scalars(out)
    assert [round(lr / 1e-3, 4) for lr in scalars["lr"]] == [0.3333, 0.6667, 1.0, 0.75, 0.25, 0.0]  # 3 warm-up steps, then cosine
    for tag in ("loss", "lr", "trainable_fraction", "activation_bytes_stored", "activation_bytes_raw"):
        assert len(scalars[tag]) == 6, tag
    assert all(0 < f < 1 for f in scalars["trainable_fraction"])
    assert all(s < r for s, r in zip(scalars["activation_bytes_stored"], scalars["activation_bytes_raw"]))
    assert len(scalars["test_accuracy"]) == 1


def test_compare_other_arms_freeze_only_lisa_and_lora(assets, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "compare"
    result = finetune.main(["--model", str(assets["bert"]), "--train-file", str(assets["train_csv"]), "--test-file",
                            str(assets["test_csv"]), *TEXT, *SMALL, "--epochs", "1", "--compare", "freeze_only,lisa,lora", "--output-dir", str(out)])
    arms = result["arms"]
    peak = {name: arm["memory"]["peak"] for name, arm in arms.items()}
    assert peak["freeze_only"]["activations"] == peak["freeze_only"]["activations_raw"]  # no compression
    assert arms["lisa"]["report"]["scheduler"] == "random_layers"
    assert arms["lora"]["adapters"] and arms["lora"]["report"] is None
    # Adam state for adapters and head only (freeze_only pages the state of frozen units to host,
    # so LISA, which keeps the state of every block it has trained, is the comparison here)
    assert peak["lora"]["optimizer"] < peak["lisa"]["optimizer"]
    AutoModelForSequenceClassification.from_pretrained(out / "lora" / "final")  # adapters merged: a plain model
