"""SFT rows to tokens: each TRL format, loss only on completion / assistant tokens, truncation
counts, and a one-line ``RecipeError`` for every unusable input."""

from __future__ import annotations

import pytest
from datasets import Dataset, DatasetDict
from sft_fixtures import CHATML_GENERATION, chat_tokenizer

from slimfit_accel.recipes import RecipeError
from slimfit_accel.recipes.sft import IGNORE, MESSAGES, PROMPT_COMPLETION, TEXT, assistant_token_mask, detect_format, tokenize_sft


def splits(rows: list[dict], test: list[dict] | None = None) -> DatasetDict:
    return DatasetDict(train=Dataset.from_list(rows), test=Dataset.from_list(test if test is not None else rows))


def tokens(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(ids))


def learnt(tokenizer, row) -> list[str]:
    """The tokens whose label is not ignored, checking each such label equals its input id."""
    out = []
    for token_id, label in zip(row["input_ids"], row["labels"]):
        if label != IGNORE:
            assert label == token_id
            out.append(tokenizer.convert_ids_to_tokens(token_id))
    return out


def test_detect_format():
    assert detect_format(["messages", "id"]) == MESSAGES
    assert detect_format(["prompt", "completion"]) == PROMPT_COMPLETION
    assert detect_format(["text"]) == TEXT


def test_prompt_completion_strings_learn_the_completion_and_eos_only():
    tok = chat_tokenizer()
    data = tokenize_sft(splits([{"prompt": "what is the answer", "completion": " yes"}]), tok, max_length=32)
    row = data.splits["train"][0]
    assert tokens(tok, row["input_ids"]) == ["what", "is", "the", "answer", "yes", "<|im_end|>"]
    assert row["labels"][:4] == [IGNORE] * 4
    assert row["labels"][4:] == row["input_ids"][4:]
    assert data.prompts["reference"] == [" yes"]
    assert tokens(tok, data.prompts["prompt_ids"][0]) == ["what", "is", "the", "answer"]


def test_prompt_completion_messages_use_the_chat_template():
    tok = chat_tokenizer()
    rows = [{"prompt": [{"role": "system", "content": "a"}, {"role": "user", "content": "good movie"}],
             "completion": [{"role": "assistant", "content": "fresh"}]}]
    data = tokenize_sft(splits(rows), tok, max_length=32)
    row = data.splits["train"][0]
    assert tokens(tok, row["input_ids"]) == ["<|im_start|>", "system", "a", "<|im_end|>", "<|im_start|>", "user", "good",
                                             "movie", "<|im_end|>", "<|im_start|>", "assistant", "fresh", "<|im_end|>"]
    assert row["labels"] == [IGNORE] * 11 + row["input_ids"][11:]
    assert tokens(tok, data.prompts["prompt_ids"][0]) == tokens(tok, row["input_ids"])[:11]  # ends with the generation prompt
    assert data.prompts["reference"] == ["fresh"]


@pytest.mark.parametrize("template", ["incremental", "generation markers"])
def test_messages_learn_every_assistant_turn_and_nothing_else(template):
    tok = chat_tokenizer(CHATML_GENERATION) if template == "generation markers" else chat_tokenizer()
    conversation = [{"role": "system", "content": "a"}, {"role": "user", "content": "what is a"},
                    {"role": "assistant", "content": "b c"}, {"role": "user", "content": "what is d"},
                    {"role": "assistant", "content": "e"}]
    data = tokenize_sft(splits([{"messages": conversation}]), tok, max_length=64)
    row = data.splits["train"][0]
    assert learnt(tok, row) == ["b", "c", "<|im_end|>", "e", "<|im_end|>"]
    names = tokens(tok, row["input_ids"])
    for i, label in enumerate(row["labels"]):  # token by token: only the assistants' words and end tokens
        assert (label != IGNORE) == (i in {names.index("b"), names.index("c"), names.index("c") + 1, names.index("e"), names.index("e") + 1})
    # generation: the conversation up to the last assistant turn, with the generation prompt; its content as reference
    assert tokens(tok, data.prompts["prompt_ids"][0])[-3:] == ["<|im_end|>", "<|im_start|>", "assistant"]
    assert data.prompts["reference"] == ["e"]


def test_incremental_mask_equals_generation_markers():
    conversation = [{"role": "user", "content": "what is a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}, {"role": "assistant", "content": "d e f"}]
    assert assistant_token_mask(chat_tokenizer(), conversation) == assistant_token_mask(chat_tokenizer(CHATML_GENERATION), conversation)


def test_text_learns_every_token_with_eos():
    tok = chat_tokenizer()
    row = tokenize_sft(splits([{"text": "the movie is good"}]), tok, max_length=32)
    assert tokens(tok, row.splits["train"][0]["input_ids"]) == ["the", "movie", "is", "good", "<|im_end|>"]
    assert row.splits["train"][0]["labels"] == row.splits["train"][0]["input_ids"]
    assert len(row.prompts) == 0


def test_train_on_prompt_learns_every_token():
    tok = chat_tokenizer()
    data = tokenize_sft(splits([{"prompt": "what is the answer", "completion": " yes"}]), tok, max_length=32, train_on_prompt=True)
    assert data.splits["train"][0]["labels"] == data.splits["train"][0]["input_ids"]


def test_truncation_counts_cut_completions_and_skips_rows_with_nothing_left():
    tok = chat_tokenizer()
    rows = [
        {"prompt": "a b", "completion": " c d"},          # 2 + 3 tokens (eos): the eos is cut
        {"prompt": "a", "completion": " b"},              # 1 + 2 tokens: whole
        {"prompt": "a b c d e", "completion": " f"},      # the prompt fills max_length: nothing to learn, skipped
        {"prompt": "a b c", "completion": " d e"},        # one completion token left: kept, counted as cut
    ]
    data = tokenize_sft(splits(rows), tok, max_length=4)
    counts = data.counts["train"]
    assert (counts.rows, counts.kept, counts.truncated_completions, counts.skipped_nothing_to_learn) == (4, 3, 3, 1)
    assert [len(ids) for ids in data.splits["train"]["input_ids"]] == [4, 3, 4]
    assert counts.loss_tokens == 2 + 2 + 1
    assert data.summary()["counts"]["train"]["skipped_nothing_to_learn"] == 1
    assert len(data.prompts) == 3 and "raise --max-length" in data.notes()[0]


def one_line_error(rows, tokenizer=None, **kwargs) -> str:
    with pytest.raises(RecipeError) as error:
        tokenize_sft(splits(rows), tokenizer or chat_tokenizer(), max_length=kwargs.pop("max_length", 32), **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("rows, expected", [
    ([{"prompt": "a"}], "no 'completion' column"),
    ([{"completion": "a"}], "no 'prompt' column"),
    ([{"question": "a", "answer": "b"}], "no SFT columns"),
    ([{"prompt": "a", "completion": "  "}], "(train row 0): 'completion' is empty"),
    ([{"text": ""}], "'text' is empty"),
    ([{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}], "both be strings or both be message lists"),
    ([{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": ""}]}], "the completion is empty"),
    ([{"messages": [{"role": "user", "content": "a"}]}], "no assistant turn"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}], "last assistant turn is empty"),
    ([{"messages": [{"role": "user", "text": "a"}]}], "message 0 must be"),
])
def test_bad_rows_fail_with_one_line(rows, expected):
    assert expected in one_line_error(rows)


def test_messages_without_chat_template():
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    assert "no chat template" in one_line_error(rows, chat_tokenizer(template=None))


def test_every_row_with_nothing_to_learn():
    assert "all 1 rows are left with nothing to learn" in one_line_error([{"prompt": "a b c d", "completion": " e"}], max_length=3)


def test_a_later_bad_row_is_named():
    rows = [{"prompt": "a", "completion": " b"}, {"prompt": "a", "completion": ""}]
    assert "train row 1" in one_line_error(rows)
