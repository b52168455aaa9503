"""Memory by category of fine-tuning arms, side by side on the same model, batch and data.

Arms: full fine-tuning; full with activation checkpointing; LoRA (PEFT, r=8 on the attention
projections); LISA-style random layers (2 blocks, switched every 20 steps); BAdam (the ``badam``
package: one block trained at a time, its Adam state only); GaLore (the ``galore-torch``
package: low-rank projected Adam state, rank ``--galore-rank``); SlimFit freezing only; SlimFit
freezing plus the default compression; ``slimfit_default``: the packaged default config the
recipe uses for the model's task (``slimfit_accel/configs/demo.yaml`` for BERT, ``sft.yaml`` for
the Llama decoder; read when the arm runs, so it measures what users get);
``slimfit_default_ratio``: that config with ``--freeze-ratio``; ``slimfit_best``: that config
with ``--freeze-ratio``, block checkpointing and optimizer paging stepped in backward;
on CUDA also activation offloading (saved tensors moved to pinned host memory, as torchtune and
TRL do); ``slimfit_int8``: ``slimfit_best`` with ``frozen_weights: int8`` (frozen matrices as int8
codes + fp32 row scales on the device).

``--precision bf16`` runs the arms a bf16 user compares (``BF16_ARMS``): ``full_amp``
(Accelerate's bf16 mixed precision: fp32 weights, master and AdamW state, bf16 autocast),
``full_bf16`` (pure bf16 weights and AdamW state, torchtune style), ``full_checkpointing``,
``lora``, ``badam``, ``slimfit_default``, ``slimfit_best`` (both: bf16 weights, fp32 masters on host, as the recipe runs them) and
``slimfit_int8``; every forward under bf16 autocast, a Llama decoder's loss over its vocabulary. Every arm gets a fresh model from the same seed and the same random token ids; bytes
come from ``slimfit_accel.memory.MemoryMeter`` (exact tensor sizes, followed over time: the
total is the largest sum at any moment of a step), the figures of an arm are the largest over
its measured steps, and the step time is their mean.

Steady state ("steady total"): what an arm holds once training has gone on. Arms built on
SlimFit start with AdamW state for every parameter (as once every unit has trained), so it is
measured, resident or paged. Under optimizer paging the measured steps may have drawn small
units; the steady total is then also bounded by the largest step the config allows: the
gradient shortfall against the step's budget is added to the measured peak, and the optimizer
step is bounded by all the budget's gradients plus the largest chunk of state paging streams.
Arms whose scheduler has a parameter budget (ILS) also measure one step more, which trains the
units whose gradients backward makes first (the LM head, then the last blocks' matrices) as far
as the budget allows: their gradients are held while nearly every activation still is
(``slimfit_accel.estimate.first_gradients_draw``). Its bytes count; its time does not.

Models: ``--model bert`` (sequence classification) or ``--model llama`` (a Llama-style decoder,
random init, causal LM loss; e.g. ``--hidden 2048 --layers 8 --heads 16 --intermediate 5504
--seq-len 512 --vocab 32000``).

Packages: the LoRA, BAdam and GaLore arms need the ``bench`` extra (``pip install
'slimfit-accel[bench]'``); every requested arm's packages are checked before the first arm runs.
Results are written after every finished arm (``--json``, by default ``runs/memory/``), marked
``"complete": false`` until the last one, so a run that stops keeps what it measured.

Quick check::

    python benchmarks/memory.py --layers 2 --hidden 128 --heads 2 --intermediate 512 \
        --batch 8 --seq-len 32 --json /tmp/memory.json

Full run (BERT-base geometry, CPU: about an hour)::

    python benchmarks/memory.py --json benchmarks/results/cpu_bert_base.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimfit_accel import SlimFit  # noqa: E402
from slimfit_accel.compression import CompressionEngine, CompressionPolicy, CompressorSpec  # noqa: E402
from slimfit_accel.estimate import BEST_PLACEMENT, BEST_STEP, worst_case_total  # noqa: E402
from slimfit_accel.memory import MemoryMeter, format_bytes  # noqa: E402

#: Import name -> (distribution, slimfit-accel extra that installs it), for the arms' requirements.
PACKAGES = {"transformers": ("transformers", "recipes"), "peft": ("peft", "bench"), "badam": ("badam", "bench"),
            "galore_torch": ("galore-torch", "bench")}
#: What every arm imports (the models).
BASE_REQUIRES = ("transformers",)
ARMS = ["full", "full_checkpointing", "lora", "lisa", "badam", "galore", "slimfit_freeze", "slimfit_compress", "slimfit_default", "slimfit_default_ratio", "slimfit_best", "slimfit_int8"]
#: The arms ``--precision bf16`` runs by default (issue 17's table); the first two only exist in bf16.
BF16_ARMS = ["full_amp", "full_bf16", "full_checkpointing", "lora", "badam", "slimfit_default", "slimfit_best", "slimfit_int8"]
BF16_ONLY = ["full_amp", "full_bf16"]
def default_config_path(args) -> Path:
    """The packaged default the recipe uses for the model's task (as ``slimfit-accel estimate``):
    ``sft.yaml`` for the Llama decoder (``--task sft``), ``demo.yaml`` for the BERT classifier."""
    from slimfit_accel.configs import packaged_config

    return Path(packaged_config("sft" if args.model == "llama" else "demo"))
CUDA_ARMS = ["full_offload"]


def build_model(args: argparse.Namespace, device: torch.device):
    torch.manual_seed(args.seed)
    if args.model == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads, intermediate_size=args.intermediate,
            max_position_embeddings=max(512, args.seq_len), use_cache=False, tie_word_embeddings=args.tie_embeddings,
        )
        return LlamaForCausalLM(config).to(device).train()
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, intermediate_size=args.intermediate,
        max_position_embeddings=max(512, args.seq_len), num_labels=2,
    )
    return BertForSequenceClassification(config).to(device).train()


def make_batch(args: argparse.Namespace, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    if args.model == "llama":
        ids = torch.randint(0, args.vocab, (batch, args.seq_len), generator=generator).to(device)
        return {"input_ids": ids, "labels": ids}
    return {
        "input_ids": torch.randint(0, args.vocab, (batch, args.seq_len), generator=generator).to(device),
        "labels": torch.randint(0, 2, (batch,), generator=generator).to(device),
    }


def adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-5)


class _HostCopy:
    """A saved tensor moved to host memory. Not a tensor, so the engine counts it as 0 device bytes."""

    __slots__ = ("tensor", "device")

    def __init__(self, tensor: torch.Tensor, device: torch.device):
        self.tensor, self.device = tensor, device


class HostOffload:
    """Compressor that moves saved tensors to (pinned) host memory, like ``save_on_cpu``."""

    def pack(self, tensor: torch.Tensor, ctx: Any = None) -> _HostCopy:
        host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=tensor.is_cuda)
        host.copy_(tensor, non_blocking=tensor.is_cuda)
        return _HostCopy(host, tensor.device)

    def unpack(self, packed: _HostCopy) -> torch.Tensor:
        return packed.tensor.to(packed.device, non_blocking=True)


# ------------------------------------------------------------------------------------- arms
def requires(*modules: str) -> Callable[[Callable], Callable]:
    """Declare the import names an arm needs beyond ``BASE_REQUIRES`` (checked before any arm runs)."""

    def mark(builder: Callable) -> Callable:
        builder.requires = modules
        return builder

    return mark


# Each returns (model, optimizer, meter, step context factory, cleanup, whether the step
# context already runs the meter: SlimFit's step() enters its own meter, ``slimfit.memory``).
# Arms built on SlimFit (LISA-style included) start from the steady state: AdamW state for every
# parameter exists before the first step (``prime_optimizer_state``), as it does once every unit
# has trained, so what is measured is what the arm holds then (paged to host or resident).


def attention_projections(args) -> list[str]:
    return ["q_proj", "k_proj", "v_proj"] if args.model == "llama" else ["query", "key", "value"]


def block_prefixes(model, args) -> list[str]:
    from slimfit_accel.units import find_blocks

    return [f"{path}." for path in find_blocks(model)]


def head_prefixes(args) -> list[str]:
    return ["lm_head."] if args.model == "llama" else ["classifier."]
def arm_full(args, device):
    model = build_model(args, device)
    optimizer = adamw(model.parameters())
    return model, optimizer, MemoryMeter(model, optimizer), None, None, False


def arm_full_amp(args, device):
    """Accelerate's ``mixed_precision="bf16"``: fp32 weights (their own masters) and fp32 AdamW
    state, the forward under bf16 autocast (``run_arm`` enters it for every arm in bf16)."""
    return arm_full(args, device)


def arm_full_bf16(args, device):
    """Pure bf16 training (torchtune style): bf16 weights, gradients and AdamW state, no fp32 copy."""
    model = build_model(args, device).to(torch.bfloat16)
    optimizer = adamw(model.parameters())
    return model, optimizer, MemoryMeter(model, optimizer), None, None, False


def arm_full_checkpointing(args, device):
    model = build_model(args, device)
    # Reentrant checkpointing saves the block inputs through autograd and recomputes each block
    # with grad enabled in backward, inside the meter's counting hooks: the recomputed block's
    # saved tensors are counted while they are alive. (Non-reentrant checkpointing keeps them
    # out of reach of outer saved-tensor hooks, so they could not be counted.)
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    optimizer = adamw(model.parameters())
    return model, optimizer, MemoryMeter(model, optimizer), None, None, False


@requires("peft")
def arm_lora(args, device):
    from peft import LoraConfig, get_peft_model

    task = "CAUSAL_LM" if args.model == "llama" else "SEQ_CLS"
    base = build_model(args, device)
    if args.precision == "bf16":  # the frozen base in bf16 (PEFT keeps the adapters fp32)
        base = base.to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=attention_projections(args), task_type=task))
    optimizer = adamw(model.parameters())
    return model, optimizer, MemoryMeter(model, optimizer), None, None, False


@requires("badam")
def arm_badam(args, device):
    """BAdam from its package: one block trains at a time (switched every 100 steps, as in its
    paper), the head always; Adam state for that block only, plus BAdam's fp32 copy of it. Under
    ``--precision bf16`` the model is bf16, as BAdam expects."""
    from badam import BlockOptimizer

    model = build_model(args, device)
    if args.precision == "bf16":  # as BAdam is meant to run: a bf16 model, its fp32 copy of the active block only
        model = model.to(torch.bfloat16)
    blocks = block_prefixes(model, args)
    base = torch.optim.AdamW(model.parameters(), lr=1e-5)
    optimizer = BlockOptimizer(
        base_optimizer=base, named_parameters_list=list(model.named_parameters()),
        block_prefix_list=[[prefix] for prefix in blocks], active_modules=head_prefixes(args),
        switch_block_every=100, switch_mode="random", verbose=0,
    )
    # the meter reads the state BAdam keeps in its base optimizer (its own ``state`` is empty)
    return model, optimizer, MemoryMeter(model, optimizer.base_optimizer), None, None, False


@requires("galore_torch")
def arm_galore(args, device):
    """GaLore from its package (``galore_torch.GaLoreAdamW``): attention and FFN weight matrices
    get low-rank projected Adam state (rank ``--galore-rank``, projection updated every 200
    steps, scale 0.25, as in its README); every other parameter plain AdamW."""
    from galore_torch import GaLoreAdamW

    model = build_model(args, device)
    blocks = tuple(block_prefixes(model, args))
    low_rank = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith(blocks)]
    chosen = {id(p) for p in low_rank}
    regular = [p for p in model.parameters() if id(p) not in chosen]
    groups = [{"params": regular}, {"params": low_rank, "rank": args.galore_rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}]
    optimizer = GaLoreAdamW(groups, lr=1e-5)
    return model, optimizer, MemoryMeter(model, optimizer), None, None, False


#: meter id -> the SlimFit object of the arm (for the worst-case trained set under paging)
SLIMFIT_OF: dict[int, SlimFit] = {}


def prime_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer state of every parameter, as once every unit has trained: one step
    with zero gradients (AdamW moves the weights by weight decay only)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _slimfit_arm(args, device, config):
    model = build_model(args, device)
    # every step measured: the arms' figures are exact peaks (memory_meter samples by default)
    slimfit = SlimFit.from_config(config, memory_meter="always")
    model = slimfit.prepare_model(model)
    optimizer = adamw(model.parameters())
    if slimfit.master_weights is not None:  # fp32 state, as the update on the fp32 masters creates it
        from slimfit_accel.estimate import prime_with_masters

        prime_with_masters(optimizer, slimfit.master_weights)
    else:
        prime_optimizer_state(optimizer)
    slimfit.attach(None, model, optimizer)
    SLIMFIT_OF[id(slimfit.memory)] = slimfit
    # slimfit.step() runs slimfit.memory (without compression it counts what autograd saves)
    return model, optimizer, slimfit.memory, slimfit.step, slimfit.detach, True


def arm_lisa(args, device):
    return _slimfit_arm(args, device, {"seed": args.seed, "scheduler": {"name": "random_layers", "n_blocks": 2, "interval": 20}, "compression": "none"})


def arm_slimfit_freeze(args, device):
    return _slimfit_arm(args, device, {"seed": args.seed, "scheduler": {"name": "ils", "freeze_ratio": args.freeze_ratio}, "compression": "none"})


def arm_slimfit_compress(args, device):
    return _slimfit_arm(args, device, {"seed": args.seed, "scheduler": {"name": "ils", "freeze_ratio": args.freeze_ratio}, "compression": "slimfit"})


def arm_slimfit_default(args, device):
    """The packaged default config, read now: what a user gets from it (under ``--precision bf16``
    as the recipe's ``--mixed-precision bf16`` runs it: bf16 weights, fp32 masters on host)."""
    import yaml

    config = yaml.safe_load(default_config_path(args).read_text())
    if args.precision == "bf16" and config.get("optimizer_paging") and "master_weights" not in config:
        config["master_weights"] = "host"
    return _slimfit_arm(args, device, config)


def _default_config_at_ratio(args) -> dict:
    import yaml

    config = yaml.safe_load(default_config_path(args).read_text())
    config["scheduler"] = {**config.get("scheduler", {"name": "ils"}), "freeze_ratio": args.freeze_ratio}
    return config


def arm_slimfit_default_ratio(args, device):
    """The default config with ``--freeze-ratio``: the memory side of the freeze-ratio trade."""
    return _slimfit_arm(args, device, _default_config_at_ratio(args))


def arm_slimfit_best(args, device):
    """The default config with ``--freeze-ratio``, every block checkpointed and optimizer paging with
    the step in backward (``slimfit_accel.estimate.BEST_STEP``), a never-trained input embedding on
    host (``BEST_PLACEMENT``); for the Llama decoder also the
    chunked loss, and under ``--precision bf16`` fp32 masters on host."""
    return _slimfit_arm(args, device, _slimfit_best_config(args))


def _slimfit_best_config(args) -> dict:
    config = _default_config_at_ratio(args)
    config.update(checkpointing={"blocks": "all"}, optimizer_paging=True, compression="slimfit", **BEST_STEP, **BEST_PLACEMENT)
    if args.model == "llama":  # no logits kept, 256 tokens a chunk (as slimfit_accel.estimate's slimfit_best)
        config["chunked_loss"] = {"chunk_size": 256}
    if args.precision == "bf16":  # bf16 weights on the device, fp32 masters on host
        config["master_weights"] = "host"
    return config


def arm_slimfit_int8(args, device):
    """``slimfit_best`` with ``frozen_weights: int8``: every schedulable matrix held on the device as
    int8 codes + fp32 row scales, a step's trained ones also in full precision while they train."""
    config = _slimfit_best_config(args)
    config["frozen_weights"] = "int8"
    return _slimfit_arm(args, device, config)


def arm_full_offload(args, device):
    model = build_model(args, device)
    optimizer = adamw(model.parameters())
    policy = CompressionPolicy(default=CompressorSpec(name="host_offload"), min_numel=0)
    engine = CompressionEngine(model, policy, compressors={"host_offload": HostOffload}, swap_layernorm=False).attach()
    return model, optimizer, MemoryMeter(model, optimizer, engine), engine.step, engine.detach, False


ARM_BUILDERS: dict[str, Callable] = {name: globals()[f"arm_{name}"] for name in ARMS + BF16_ONLY + CUDA_ARMS}


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing_packages(arms: list[str], installed: Callable[[str], bool] = is_installed) -> str | None:
    """One line naming the arms whose packages are not installed, the packages and the extra to
    install; None when every arm can run."""
    missing: dict[str, list[str]] = {}  # import name -> arms that need it
    for name in arms:
        for module in BASE_REQUIRES + getattr(ARM_BUILDERS[name], "requires", ()):
            if not installed(module):
                missing.setdefault(module, []).append(name)
    if not missing:
        return None
    names = list(dict.fromkeys(arm for needing in missing.values() for arm in needing))
    packages = [PACKAGES.get(module, (module, None))[0] for module in missing]
    extras = sorted({PACKAGES[module][1] for module in missing if module in PACKAGES})
    install = f"pip install 'slimfit-accel[{','.join(extras)}]'" if extras else f"pip install {' '.join(packages)}"
    return (f"arm{'s' if len(names) > 1 else ''} {', '.join(names)} need{'s' if len(names) == 1 else ''} "
            f"package{'s' if len(packages) > 1 else ''} {', '.join(packages)}: {install}")


def write_results(path: Path, config: dict[str, Any], results: list[dict[str, Any]], complete: bool,
                  failed: dict[str, str] | None = None) -> None:
    """The JSON so far, replaced atomically: valid after every arm, ``complete`` only at the end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"config": config, "complete": complete, "arms": results} | ({"failed": failed} if failed else {})
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document, indent=2))
    partial.replace(path)


# ------------------------------------------------------------------------------------- running
def run_arm(name: str, args: argparse.Namespace, batch_size: int, device: torch.device) -> dict[str, Any]:
    model, optimizer, meter, step_ctx, cleanup, metered = ARM_BUILDERS[name](args, device)
    batch = make_batch(args, batch_size, device)
    measured, times = [], []
    # SlimFit arms with a parameter budget (ILS): after the drawn steps, one that trains the units
    # whose gradients backward makes first, as many as the budget allows
    # (``slimfit_accel.estimate.first_gradients_draw``: an LM head first); its bytes count, its
    # time does not (``step_time_s`` is the drawn steps').
    from slimfit_accel.estimate import first_gradients_draw

    slimfit = SLIMFIT_OF.get(id(meter))
    first = first_gradients_draw(slimfit) if slimfit is not None else None
    drawn = args.warmup + args.steps
    for index in range(drawn + (first is not None)):
        if index == drawn:
            slimfit.controller.decide_next(first)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()  # the whole step, freeze decision included
        with ExitStack() as stack:
            if not metered:
                stack.enter_context(meter.step())
            if step_ctx is not None:
                stack.enter_context(step_ctx())
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if index >= args.warmup:
            measured.append(meter.last)
            if index < drawn:
                times.append(elapsed)
        print(f"  {name} batch {batch_size} step {index}: {elapsed:.1f} s, total {format_bytes(meter.last.total)}", flush=True)
    peak = {key: max(getattr(m, key) for m in measured) for key in ("params", "grads", "optimizer", "activations", "activations_raw", "total", "optimizer_paged", "weights_host")}
    cuda_peaks = [m.peak_cuda for m in measured if m.peak_cuda is not None]
    # Steady state: every arm's optimizer state is measured as it is once training has gone on
    # (SlimFit arms start primed; the others hold all they ever hold after the warm-up step).
    # Under paging the state of the trained units is on the device only while the step streams
    # it; the measured steps may have drawn small units, so the step is also bounded by the
    # largest it can be, and the gradient shortfall is added to the peak (``worst_case_total``).
    slimfit = SLIMFIT_OF.pop(id(meter), None)
    bound = worst_case_total(slimfit, optimizer, peak, cuda=device.type == "cuda") if slimfit is not None else None
    steady_total = bound.total if bound is not None else peak["total"]
    full_state = peak["optimizer"] + peak["optimizer_paged"]
    result = {
        "name": name,
        "batch": batch_size,
        "bytes": {k: peak[k] for k in ("params", "grads", "optimizer", "activations", "total")},
        "step_time_s": sum(times) / len(times),
        "peak_cuda_bytes": max(cuda_peaks) if cuda_peaks else None,
        # extras
        "activations_raw_bytes": peak["activations_raw"],
        "step_times_s": times,
        "trainable_params": sum(p.numel() for group in optimizer.param_groups for p in group["params"]),
        # Few steps understate the optimizer state of arms that train a subset per step (it grows
        # as more units are trained and is never released): the figure once all are stepped.
        "optimizer_full_state_bytes": full_state,
        "optimizer_paged_bytes": peak["optimizer_paged"],
        "steady_state": {
            "optimizer_device_bytes": peak["optimizer"],  # peak resident (under paging: in the step)
            "optimizer_host_bytes": peak["optimizer_paged"],
            "weights_host_bytes": peak["weights_host"],  # input_embedding: host
            "total_bytes": steady_total,
            "gradients_worst_case_extra_bytes": bound.gradients_extra if bound is not None else 0,
            "weights_worst_case_extra_bytes": bound.weights_extra if bound is not None else 0,  # frozen_weights: int8: more trained copies than measured
        },
        "by_compressor": meter.summary().by_compressor,
    }
    meter.close()
    if cleanup is not None:
        cleanup()
    del model, optimizer, meter, batch, measured, step_ctx, cleanup
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def render_table(arms: list[dict[str, Any]], width: int = 190) -> str:
    from rich.console import Console
    from rich.table import Table

    out = Console(width=width, force_terminal=False, color_system=None, record=True, file=open(os.devnull, "w"))
    for batch_size in sorted({a["batch"] for a in arms}):
        rows = [a for a in arms if a["batch"] == batch_size]
        full = next((a for a in rows if a["name"] == "full"), None) or next((a for a in rows if a["name"] == "full_amp"), None)
        table = Table(title=f"batch {batch_size}: bytes by category (x = full fine-tuning / arm)", header_style="bold")
        columns = ("arm", "params", "grads", "optimizer", "act. raw", "act. stored", "act. x", "total", "total x",
                   "steady opt.", "steady total", "steady x", "step s", "time / full")
        for column in columns:
            table.add_column(column, justify="left" if column == "arm" else "right")
        if rows and rows[0]["peak_cuda_bytes"] is not None:
            table.add_column("CUDA peak", justify="right")
        for a in rows:
            b = a["bytes"]
            cells = [
                a["name"], format_bytes(b["params"]), format_bytes(b["grads"]), format_bytes(b["optimizer"]),
                format_bytes(a["activations_raw_bytes"]), format_bytes(b["activations"]),
                _ratio(full["bytes"]["activations"], b["activations"]) if full else "-",
                format_bytes(b["total"]),
                _ratio(full["bytes"]["total"], b["total"]) if full else "-",
                format_bytes(a["steady_state"]["optimizer_device_bytes"]),
                format_bytes(a["steady_state"]["total_bytes"]),
                _ratio(full["steady_state"]["total_bytes"], a["steady_state"]["total_bytes"]) if full else "-",
                f"{a['step_time_s']:.2f}",
                f"{a['step_time_s'] / full['step_time_s']:.2f}" if full else "-",
            ]
            if a["peak_cuda_bytes"] is not None:
                cells.append(format_bytes(a["peak_cuda_bytes"]))
            table.add_row(*cells)
        out.print(table)
    return out.export_text()


def _ratio(numerator: int, denominator: int) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else "inf"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bert", "llama"], default="bert", help="encoder (BERT) or Llama-style decoder")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--kv-heads", type=int, default=None, help="llama: key/value heads (default: --heads)")
    parser.add_argument("--tie-embeddings", action="store_true", help="llama: the head shares the input embeddings")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: the forward under bf16 autocast (fp32 weights and AdamW), slimfit_best with fp32 masters on host")
    parser.add_argument("--freeze-ratio", type=float, default=0.9, help="slimfit_freeze/compress/default_ratio/best (slimfit_default: its file's)")
    parser.add_argument("--galore-rank", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per arm")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per arm")
    parser.add_argument("--arms", nargs="+", default=None,
                        help=f"subset of {ARMS + BF16_ONLY + CUDA_ARMS} (default: all; with --precision bf16: {BF16_ARMS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None,
                        help="write results here after every arm (default: runs/memory/MODEL-TIME.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    arms = args.arms or ((BF16_ARMS if args.precision == "bf16" else ARMS) + (CUDA_ARMS if device.type == "cuda" else []))
    unknown = set(arms) - set(ARM_BUILDERS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; choose from {ARMS + BF16_ONLY + CUDA_ARMS}")
    if args.precision != "bf16" and set(arms) & set(BF16_ONLY):
        parser.error(f"arms {sorted(set(arms) & set(BF16_ONLY))} compare bf16 training: add --precision bf16")
    missing = missing_packages(arms)
    if missing:  # before the first arm: not after an hour of the others
        print(f"error: {missing} (or leave those arms out with --arms)", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    out = args.json or Path("runs") / "memory" / f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    config = {
        "model": f"{args.model} (random init)", "default_config": str(default_config_path(args)), "galore_rank": args.galore_rank, "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
        "intermediate": args.intermediate, "vocab": args.vocab, "kv_heads": args.kv_heads or args.heads,
        "tie_embeddings": args.tie_embeddings, "precision": args.precision, "seq_len": args.seq_len, "batches": args.batch,
        "freeze_ratio": args.freeze_ratio, "optimizer": "AdamW fp32", "warmup_steps": args.warmup,
        "measured_steps": args.steps, "device": str(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "host": platform.node(), "started": started,
    }
    print(f"results go to {out}, written after every arm", flush=True)
    results: list[dict[str, Any]] = []
    for batch_size in args.batch:
        for name in arms:
            print(f"arm {name}, batch {batch_size}", flush=True)
            try:
                results.append(run_arm(name, args, batch_size, device))
            except BaseException as err:  # keep what was measured, say what stopped it
                write_results(out, config, results, complete=False,
                              failed={"arm": name, "batch": batch_size, "error": f"{type(err).__name__}: {err}"})
                raise
            write_results(out, config, results, complete=len(results) == len(arms) * len(args.batch))
    print(render_table(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
