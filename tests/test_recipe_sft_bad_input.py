"""Bad SFT input through the command line: one line that says what to change, exit code 2,
nothing trained and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimfit_accel import finetune

from recipe_fixtures import reviews as classification_rows
from recipe_fixtures import write_bert, write_table
from test_recipe_sft import rows_in, write_llama

SMALL = ["--epochs", "1", "--batch-size", "8", "--max-length", "32"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe-sft-inputs")
    chats = rows_in("prompt_completion_messages", 16, seed=0)
    strings = rows_in("prompt_completion", 16, seed=0)
    return {
        "llama": write_llama(root / "llama"),
        "llama_no_template": write_llama(root / "llama-no-template", template=False),
        "bert": write_bert(root / "bert"),
        "chats": write_table(root / "chats.jsonl", chats),
        "messages": write_table(root / "messages.jsonl", rows_in("messages", 16, seed=0)),
        "text": write_table(root / "text.jsonl", rows_in("text", 16, seed=0)),
        "prompt_only": write_table(root / "prompt_only.jsonl", [{"prompt": r["prompt"]} for r in strings]),
        "empty_completion": write_table(root / "empty.jsonl", [dict(r, completion="" if i == 3 else r["completion"]) for i, r in enumerate(strings)]),
        "long_prompts": write_table(root / "long.jsonl", [dict(r, prompt="the movie " * 20 + r["prompt"]) for r in strings]),
        "reviews": write_table(root / "reviews.csv", classification_rows(24)),
    }


CASES = {
    "no completion column": (lambda a: ["--model", str(a["llama"]), "--train-file", str(a["prompt_only"])],
                             "has a 'prompt' column but no 'completion' column; SFT rows need both"),
    "an empty completion": (lambda a: ["--model", str(a["llama"]), "--train-file", str(a["empty_completion"]), "--test-fraction", "0.25"],
                            "'completion' is empty; every row needs text to learn"),
    "messages without a chat template": (lambda a: ["--model", str(a["llama_no_template"]), "--train-file", str(a["messages"])],
                                         "'messages' holds messages but the tokenizer has no chat template"),
    "prompt messages without a chat template": (lambda a: ["--model", str(a["llama_no_template"]), "--train-file", str(a["chats"])],
                                                "'prompt' holds messages but the tokenizer has no chat template"),
    "completion always truncated away": (lambda a: ["--model", str(a["llama"]), "--train-file", str(a["long_prompts"])],
                                         "rows are left with nothing to learn at max_length 32 (the prompts fill it); raise --max-length"),
    "a model that is not a causal LM": (lambda a: ["--model", str(a["bert"]), "--train-file", str(a["chats"])],
                                        "a BertForSequenceClassification is not a causal language model, which --task sft trains"),
    "a missing gguf file": (lambda a: ["--model", "/nonexistent/model.gguf", "--train-file", str(a["chats"])],
                            "--model /nonexistent/model.gguf: no such GGUF file"),
    "generation for plain text": (lambda a: ["--model", str(a["llama"]), "--task", "sft", "--train-file", str(a["text"]), "--eval-generate", "4"],
                                  "is plain 'text' rows, which have no prompt to answer"),
    "generation for classification": (lambda a: ["--model", str(a["llama"]), "--train-file", str(a["reviews"]), "--text-column", "review",
                                                 "--label-column", "sentiment", "--eval-generate", "4"],
                                      "--eval-generate is for supervised fine-tuning"),
    "a built-in classification set": (lambda a: ["--model", str(a["llama"]), "--task", "sft", "--dataset", "rotten_tomatoes"],
                                      "--dataset rotten_tomatoes is classification data; --task sft needs rows"),
    "fp16 on a CPU": (lambda a: ["--model", str(a["llama"]), "--train-file", str(a["chats"]), "--mixed-precision", "fp16"],
                      "--mixed-precision fp16: Accelerate runs fp16 on a GPU only and would train in fp32 here without saying so"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_sft_input_is_one_line_exit_2_and_writes_nothing(assets, tmp_path, capsys, case):
    argv, message = CASES[case]
    if case == "fp16 on a CPU" and torch.cuda.is_available():
        pytest.skip("fp16 runs on a GPU")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        finetune.cli([*SMALL, *argv(assets), "--output-dir", str(out)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert "Traceback" not in err and "fine-tuning:" not in err  # refused before any step
    assert not out.exists()
