"""Bad recipe input: one line that says what to change, exit code 2, before any training, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from slimfit_accel import finetune

from recipe_fixtures import reviews, write_bert, write_table, write_vit

SMALL = ["--epochs", "1", "--batch-size", "8", "--max-length", "16"]
TEXT = ["--text-column", "review", "--label-column", "sentiment"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe-inputs")
    one_class = [dict(r, sentiment="pos") for r in reviews(24)]
    return {
        "bert": write_bert(root / "bert"),
        "bert_no_tokenizer": write_bert(root / "bert-no-tokenizer", with_tokenizer=False),
        "vit": write_vit(root / "vit"),
        "csv": write_table(root / "reviews.csv", reviews(48)),
        "one_class": write_table(root / "one_class.csv", one_class),
        "foreign": write_table(root / "foreign.csv", [{"review": "ce film était une merveille absolue", "sentiment": s} for s in ["a", "b"] * 12]),
        "bad_yaml": _write(root / "bad.yaml", "scheduler: {name: ils, freeze_ratio: [\n"),
        "bad_key": _write(root / "bad_key.yaml", "scheduler: {name: ils, freeze_ratio: 1.5}\n"),
        "root": root,
    }


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


CASES = {
    "missing model": (lambda a: ["--model", str(a["root"] / "no-such-model"), "--train-file", str(a["csv"]), *TEXT],
                      "no-such-model: no such folder"),
    "model without tokenizer": (lambda a: ["--model", str(a["bert_no_tokenizer"]), "--train-file", str(a["csv"]), *TEXT],
                                "no tokenizer files"),
    "tokenizer that does not fit the text": (lambda a: ["--model", str(a["bert"]), "--train-file", str(a["foreign"]), *TEXT],
                                             "its tokenizer turns 83% of the training text's tokens into [UNK]"),
    "batch size 0": (lambda a: ["--model", str(a["bert"]), "--train-file", str(a["csv"]), *TEXT, "--batch-size", "0"],
                     "--batch-size must be at least 1, got 0"),
    "grad accum 0": (lambda a: ["--model", str(a["bert"]), "--train-file", str(a["csv"]), *TEXT, "--grad-accum", "0"],
                     "--grad-accum must be at least 1, got 0"),
    "epochs 0": (lambda a: ["--model", str(a["bert"]), "--train-file", str(a["csv"]), *TEXT, "--epochs", "0"],
                 "--epochs must be at least 1, got 0"),
    "epochs negative": (lambda a: ["--model", str(a["bert"]), "--train-file", str(a["csv"]), *TEXT, "--epochs", "-2"],
                        "--epochs must be at least 1, got -2"),
    "train size above the data": (lambda a: ["--model", str(a["bert"]), "--train-file", str(a["csv"]), *TEXT, "--train-size", "500"],
                                  "--train-size 500 but"),
    "missing column": (lambda a: ["--model", str(a["bert"]), "--train-file", str(a["csv"]), "--text-column", "body", "--label-column", "sentiment"],
                       "no column 'body' in the train rows (columns: review, sentiment); pass --text-column"),
    "missing label column": (lambda a: ["--model", str(a["bert"]), "--train-file", str(a["csv"]), "--text-column", "review"],
                             "no column 'label' in the train rows (columns: review, sentiment); pass --label-column"),
    "one class": (lambda a: ["--model", str(a["bert"]), "--train-file", str(a["one_class"]), *TEXT],
                  "holds one class ('pos') in the training rows"),
    "image column holding text": (lambda a: ["--model", str(a["vit"]), "--train-file", str(a["csv"]), "--image-column", "review", "--label-column", "sentiment"],
                                  "column 'review' holds text"),
    "config with a YAML error": (lambda a: ["--model", str(a["bert"]), "--train-file", str(a["csv"]), *TEXT, "--slimfit-config", str(a["bad_yaml"])],
                                 "YAML syntax error"),
    "config with a bad value": (lambda a: ["--model", str(a["bert"]), "--train-file", str(a["csv"]), *TEXT, "--slimfit-config", str(a["bad_key"])],
                                "freeze_ratio must be in [0, 1), got 1.5"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(assets, tmp_path, capsys, case):
    argv, message = CASES[case]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        finetune.cli([*SMALL, *argv(assets), "--output-dir", str(out)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert "Traceback" not in err
    assert not out.exists()


def test_command_line_prints_one_line_without_traceback(assets, tmp_path):
    """The installed command, in its own process: a missing model is one line (not 72 of traceback)."""
    out = tmp_path / "out"
    cli = Path(sys.executable).with_name("slimfit-accel")
    done = subprocess.run([str(cli), "finetune", "--model", str(tmp_path / "missing"), "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()  # third-party imports may warn above it
    assert lines[-1] == (f"error: --model {tmp_path / 'missing'}: no such folder; pass a local "
                         f"Hugging Face model folder (config.json, weights, tokenizer)")
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in done.stderr
    assert not out.exists()


def test_model_without_tokenizer_is_refused_before_any_data_is_read(assets, tmp_path, capsys, monkeypatch):
    """The cheap check of the model folder comes first: no table is parsed, no progress bar drawn."""
    import datasets

    def read(*_, **__):
        raise AssertionError("the data was read before the model folder was checked")

    monkeypatch.setattr(datasets, "load_dataset", read)
    with pytest.raises(SystemExit) as exited:
        finetune.cli([*SMALL, "--model", str(assets["bert_no_tokenizer"]), "--train-file", str(assets["csv"]), *TEXT])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"error: --model {assets['bert_no_tokenizer']}: no tokenizer files")
    assert "Generating" not in err and "Map" not in err and "%|" not in err
