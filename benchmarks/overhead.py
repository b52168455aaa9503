"""SlimFit's own per-step time, apart from the model's compute, as a share of a full fine-tuning step.

A SlimFit step computes less than a full step (frozen units get no weight gradient), so comparing
step times would hide SlimFit's own work behind what it saves. This benchmark times that work
directly: every piece of SlimFit machinery a step runs is wrapped with a timer (exclusive: a
section nested in another counts once, in the innermost), and the sum is divided by the median
time of a full fine-tuning step of the same model, batch and data, measured in the same run.

Sections (SlimFit's own work):

- ``freeze_decision``: ``begin_step``/``end_step`` (scheduler pick, ``requires_grad`` switches)
- ``scorer``: the scorer's ``before_step``/``after_step`` and the controller's bookkeeping
- ``step_hooks``: SlimFit's optimizer step hooks (lr_scale, gradient hand-over), less what they
  nest: the optimizer's own update (``optimizer_update``, compute, not counted) and paging
- ``paging``: optimizer state copied in and out around the update (``optimizer_paging``)
- ``compression``: saved-tensor pack/unpack (quantize/dequantize) and the engine's module hooks
- ``meter``: the memory meter (its step start/end, gradient/optimizer/counter hooks, and the
  counting engine it installs when compression is off)

Arms, interleaved round by round on one model and one AdamW (so machine noise hits all alike;
SlimFit arms attach before their step and detach after, outside the timing):

- ``full``: plain full fine-tuning
- ``slimfit_meter_off``: the packaged decoder default (``configs/sft.yaml``), ``memory_meter: off``
- ``slimfit_meter_on``: the same, ``memory_meter: always`` (the exact meter at every step)
- ``slimfit_nocompression_meter_off`` / ``_on``: the default config with ``compression: none``
  (what SlimFit costs apart from quantizing activations)
- ``machinery_only``: SlimFit with every unit trainable, compression none, no paging, meter off:
  the same arithmetic as ``full``, so its step time minus ``full``'s is the machinery's cost
  measured the other way (noisy on a loaded machine; the sections are the figure)

The decoder default checkpoints its first blocks: their recomputation is model compute the config
adds, timed as its own section (``recompute``), reported beside SlimFit's own time, not in it.

Each round runs every arm once; the first ``--warmup`` rounds are not measured. With
``--steps-per-arm N`` an arm runs N steps in a row each round and only the last is measured: the
step after the same arm's, as in a real run. ``minor_faults`` counts the page faults of the
measured step (fresh memory from the system): at SmolLM2 8 x 512 every arm faults in its
logits-sized tensors (4096 x 49152 float32, 0.8 GB each) at every step, compression or not. Figures are
medians over the measured rounds with min and max. ``--clock cpu`` times steps and sections in
process CPU time instead of wall time: on a shared machine with ``--threads 1`` it leaves out
the time the process waits for a core, which wall time counts at random. Results: ``--json`` (default
``benchmarks/results/overhead_<geometry>.json``).

Geometries: ``tiny`` (a 2-layer Llama, seconds), ``smollm2`` (SmolLM2-135M's: hidden 576,
30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied; random init).

    python benchmarks/overhead.py --geometry tiny
    python benchmarks/overhead.py --geometry smollm2 --rounds 3     # CPU: ~10-15 minutes
    python benchmarks/overhead.py --geometry smollm2 --threads 1 --clock cpu   # shared machine
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimfit_accel import SlimFit  # noqa: E402
from slimfit_accel import checkpointing as checkpointing_module  # noqa: E402
from slimfit_accel.compression import engine as engine_module  # noqa: E402
from slimfit_accel.compression.context import ModuleContext  # noqa: E402
from slimfit_accel.controller import FreezeController  # noqa: E402
from slimfit_accel.memory import MemoryMeter, _GradTracker  # noqa: E402
from slimfit_accel.paging import OptimizerPaging  # noqa: E402

#: The packaged default the recipe uses for a decoder (``--task sft``); every model here is one.
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "slimfit_accel" / "configs" / "sft.yaml"
GEOMETRIES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1000, tied=True, batch=8, seq_len=64),
    "smollm2": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tied=True, batch=8, seq_len=512),
}
ARMS = ["full", "slimfit_meter_off", "slimfit_meter_on", "slimfit_nocompression_meter_off",
        "slimfit_nocompression_meter_on", "machinery_only"]
OVERHEAD = ("freeze_decision", "scorer", "step_hooks", "paging", "compression", "meter")
#: Model compute SlimFit's config adds (the checkpointed blocks' recomputation): reported, not overhead.
COMPUTE = ("optimizer_update", "recompute")


# ------------------------------------------------------------------------------------- timers
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter  # set by --clock


class Sections:
    """Exclusive timers: time inside a nested section is not counted in the one around it."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.faults: dict[str, int] = {}  # page faults (fresh memory from the system), exclusive too
        self._stack: list[list] = []  # [name, start, time of nested sections, faults at start, nested faults]
        self.enabled = False

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        frame = [name, clock(), 0.0, _minor_faults(), 0]
        self._stack.append(frame)
        try:
            yield
        finally:
            elapsed = clock() - frame[1]
            faults = _minor_faults() - frame[3]
            self._stack.pop()
            self.totals[name] = self.totals.get(name, 0.0) + elapsed - frame[2]
            self.faults[name] = self.faults.get(name, 0) + faults - frame[4]
            self.calls[name] = self.calls.get(name, 0) + 1
            if self._stack:
                self._stack[-1][2] += elapsed
                self._stack[-1][4] += faults

    def reset(self) -> None:
        self.totals, self.calls, self.faults = {}, {}, {}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


SECTIONS = Sections()


def _timed(name: str | Callable[[Any], str], function: Callable) -> Callable:
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        label = name(args[0]) if callable(name) else name
        with SECTIONS.section(label):
            return function(*args, **kwargs)

    return wrapper


def _label(obj: Any) -> str:
    """``meter`` for the meter's own counting engine (and its module context), else ``compression``."""
    return getattr(obj, "_overhead_label", "compression")


def _saved_label(saved: Any) -> str:
    """``meter`` for what the meter's counting engine saved (its byte counter is labelled)."""
    return getattr(getattr(saved, "counter", None), "_overhead_label", "compression")


def install_timers() -> None:
    """Wrap SlimFit's machinery, class by class, before any SlimFit is built (hooks bind methods
    when they are installed)."""
    FreezeController.begin_step = _timed("freeze_decision", FreezeController.begin_step)
    FreezeController.end_step = _timed("freeze_decision", FreezeController.end_step)
    FreezeController._before_optimizer_step = _timed("scorer", FreezeController._before_optimizer_step)
    FreezeController._after_optimizer_step = _timed("scorer", FreezeController._after_optimizer_step)
    OptimizerPaging.stream_step = _timed("paging", OptimizerPaging.stream_step)
    OptimizerPaging.evict = _timed("paging", OptimizerPaging.evict)
    engine = engine_module.CompressionEngine
    engine._pack = _timed(_label, engine._pack)
    unpack = engine._unpack
    timed_unpack = _timed(_saved_label, unpack)  # the meter's engine hands back what it kept

    def unpack_holders(saved):  # a parameter comes back as it went in: no work, not timed
        return timed_unpack(saved) if isinstance(saved, engine_module._Saved) else unpack(saved)  # noqa: SLF001

    engine._unpack = staticmethod(unpack_holders)
    make_push = ModuleContext._make_push

    def timed_make_push(self, *args, **kwargs):
        push = make_push(self, *args, **kwargs)

        def timed_push(*hook_args):
            with SECTIONS.section(_label(self)):
                return push(*hook_args)

        return timed_push

    ModuleContext._make_push = timed_make_push
    ModuleContext._pop = _timed(_label, ModuleContext._pop)
    _GradTracker._accumulated = _timed("meter", _GradTracker._accumulated)
    MemoryMeter._update = _timed("meter", MemoryMeter._update)
    MemoryMeter._optimizer_step_start = _timed("meter", MemoryMeter._optimizer_step_start)
    MemoryMeter._optimizer_step_end = _timed("meter", MemoryMeter._optimizer_step_end)
    meter_step = MemoryMeter.step

    @contextmanager
    def timed_meter_step(self, *args, **kwargs):
        manager = meter_step(self, *args, **kwargs)
        with SECTIONS.section("meter"):
            value = manager.__enter__()
        try:
            yield value
        except BaseException:
            with SECTIONS.section("meter"):
                if not manager.__exit__(*sys.exc_info()):
                    raise
        else:
            with SECTIONS.section("meter"):
                manager.__exit__(None, None, None)

    MemoryMeter.step = timed_meter_step

    class TimedRecompute(checkpointing_module._CountRecomputed):  # noqa: SLF001
        """A checkpointed block's recomputation (model compute the config adds), as its own section."""

        def __enter__(self) -> None:
            self._section = SECTIONS.section("recompute")
            self._section.__enter__()
            super().__enter__()

        def __exit__(self, *exc: Any) -> None:
            try:
                super().__exit__(*exc)
            finally:
                self._section.__exit__(*exc)

    checkpointing_module._CountRecomputed = TimedRecompute  # noqa: SLF001


def time_optimizer_update(optimizer: torch.optim.Optimizer) -> None:
    """Time the bare update SlimFit's hooks and paging run (``step.__wrapped__``) as compute, not
    overhead. After the optimizer exists: its construction wraps the class's step once more."""
    step = type(optimizer).step
    if not getattr(step.__wrapped__, "_timed", False):
        step.__wrapped__ = _timed("optimizer_update", step.__wrapped__)
        step.__wrapped__._timed = True


def wrap_step_hooks(optimizer: torch.optim.Optimizer) -> None:
    """Time every optimizer step hook installed now (SlimFit's backend and the meter)."""
    for hooks in (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks):
        for key, hook in list(hooks.items()):
            if not getattr(hook, "_timed", False):
                owner = "meter" if "MemoryMeter" in getattr(hook, "__qualname__", "") else "step_hooks"
                wrapped = _timed(owner, hook)
                wrapped._timed = True
                hooks[key] = wrapped


# ------------------------------------------------------------------------------------- model
def build_model(geometry: dict[str, Any], seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=geometry["vocab"], hidden_size=geometry["hidden"], num_hidden_layers=geometry["layers"],
        num_attention_heads=geometry["heads"], num_key_value_heads=geometry["kv_heads"],
        intermediate_size=geometry["intermediate"], max_position_embeddings=max(2048, geometry["seq_len"]),
        tie_word_embeddings=geometry["tied"], use_cache=False,
    )
    return LlamaForCausalLM(config).train()


def arm_config(name: str) -> dict[str, Any] | None:
    import yaml

    if name == "full":
        return None
    if name == "machinery_only":
        return {"scheduler": {"name": "ils", "freeze_ratio": 0.0}, "compression": "none", "memory_meter": "off"}
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["memory_meter"] = "off" if name.endswith("_meter_off") else "always"
    if name.startswith("slimfit_nocompression"):
        config["compression"] = "none"
    return config


def run_step(model, optimizer, batch, bf16: bool, slimfit: SlimFit | None) -> dict[str, float]:
    """One training step; wall time of the whole and of its phases."""
    SECTIONS.reset()
    SECTIONS.enabled = True
    faults = _minor_faults()
    start = clock()
    with (slimfit.step() if slimfit is not None else _nothing()):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    total = clock() - start
    SECTIONS.enabled = False
    sections = dict(SECTIONS.totals)
    return {"step_s": total, "sections_s": sections, "overhead_s": sum(sections.get(k, 0.0) for k in OVERHEAD),
            "minor_faults": _minor_faults() - faults, "section_faults": dict(SECTIONS.faults)}


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def attach(name: str, model, optimizer) -> SlimFit | None:
    config = arm_config(name)
    if config is None:
        return None
    slimfit = SlimFit.from_config(config)
    slimfit.prepare_model(model)
    slimfit.attach(None, model, optimizer)
    if slimfit.memory is not None and slimfit.memory._own_engine:  # noqa: SLF001
        slimfit.memory.engine._overhead_label = "meter"  # noqa: SLF001
        slimfit.memory.engine._context._overhead_label = "meter"  # noqa: SLF001
        slimfit.memory.engine._counter._overhead_label = "meter"  # noqa: SLF001
    wrap_step_hooks(optimizer)
    return slimfit


def summarise(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    geometry = dict(GEOMETRIES[args.geometry])
    if args.batch:
        geometry["batch"] = args.batch
    if args.seq_len:
        geometry["seq_len"] = args.seq_len
    install_timers()
    model = build_model(geometry, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    time_optimizer_update(optimizer)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, geometry["vocab"], (geometry["batch"], geometry["seq_len"]), generator=generator)
    batch = {"input_ids": ids, "labels": ids}
    bf16 = args.precision == "bf16"
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in args.arms}
    uptime = [os.getloadavg()]
    for round_index in range(args.warmup + args.rounds):
        for name in args.arms:
            slimfit = attach(name, model, optimizer)
            for _ in range(args.steps_per_arm):  # the last is measured
                gc.collect()
                record = run_step(model, optimizer, batch, bf16, slimfit)
            if slimfit is not None:
                slimfit.detach()
            measured = round_index >= args.warmup
            if measured:
                records[name].append(record)
            print(f"round {round_index}{'' if measured else ' (warm-up)'} {name}: step {record['step_s']:.3f} s, "
                  f"SlimFit's own {record['overhead_s'] * 1000:.1f} ms, {record['minor_faults']} page faults "
                  f"(compression {record['section_faults'].get('compression', 0)}) "
                  f"{ {k: round(v * 1000, 1) for k, v in sorted(record['sections_s'].items())} }", flush=True)
        uptime.append(os.getloadavg())
    full = summarise([r["step_s"] for r in records["full"]]) if "full" in records else None
    arms = {}
    for name, recs in records.items():
        steps = [r["step_s"] for r in recs]
        overhead = [r["overhead_s"] for r in recs]
        names = sorted({k for r in recs for k in r["sections_s"]})
        arms[name] = {
            "config": arm_config(name),
            "step_s": summarise(steps),
            "own_s": summarise(overhead),
            "sections_s": {k: summarise([r["sections_s"].get(k, 0.0) for r in recs]) for k in names},
            "own_share_of_full_step": (statistics.median(overhead) / full["median"]) if full else None,
            "own_share_range": [min(overhead) / full["median"], max(overhead) / full["median"]] if full else None,
            # SlimFit's own work plus the recomputation its checkpointing config adds
            "own_and_recompute_share_of_full_step": (statistics.median(
                [r["overhead_s"] + r["sections_s"].get("recompute", 0.0) for r in recs]) / full["median"]) if full else None,
            "step_vs_full": statistics.median(steps) / full["median"] if full else None,
            "minor_faults": summarise([r["minor_faults"] for r in recs]),
            "section_faults": {k: summarise([r["section_faults"].get(k, 0) for r in recs]) for k in names},
        }
    result = {
        "geometry": {"name": args.geometry, **geometry},
        "precision": args.precision,
        "warmup_rounds": args.warmup,
        "measured_rounds": args.rounds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "steps_per_arm": args.steps_per_arm,
        "host": platform.node(),
        "allocator_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES", "THP_MEM", "LD_PRELOAD"))},
        "load_average_1_5_15_per_round": uptime,
        "overhead_sections": list(OVERHEAD),
        "arms": arms,
    }
    if "machinery_only" in arms and full:
        diff = [m["step_s"] - f["step_s"] for m, f in zip(records["machinery_only"], records["full"])]
        result["machinery_only_minus_full_s"] = summarise(diff)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tiny")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: forward under CPU bf16 autocast")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (each runs every arm once)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds not measured")
    parser.add_argument("--steps-per-arm", type=int, default=1,
                        help="steps an arm runs in a row each round; the last is measured (steady state)")
    parser.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on a shared machine 1 avoids threads waiting on descheduled peers")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: process CPU time (use with --threads 1 on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if "full" not in args.arms:
        parser.error("the arms need 'full': every share is of a full fine-tuning step")
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    result = run(args)
    suffix = "" if args.precision == "fp32" else f"_{args.precision}"
    out = args.json or Path(__file__).resolve().parent / "results" / f"overhead_{args.geometry}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    full = result["arms"]["full"]["step_s"]
    print(f"full fine-tuning step: median {full['median']:.3f} s (min {full['min']:.3f}, max {full['max']:.3f})")
    for name, arm in result["arms"].items():
        if name == "full":
            continue
        low, high = arm["own_share_range"]
        print(f"{name}: step {arm['step_s']['median']:.3f} s ({arm['step_vs_full']:.2f}x full); SlimFit's own "
              f"{arm['own_s']['median'] * 1000:.1f} ms = {arm['own_share_of_full_step']:.2%} of a full step "
              f"(range {low:.2%}-{high:.2%})"
              + (f"; with the checkpointed blocks' recomputation {arm['own_and_recompute_share_of_full_step']:.2%}"
                 if "recompute" in arm["sections_s"] else ""))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
