"""The plugin contract of slimfit-accel: every hook and every strategy interface, in one file.

A plugin is a module (or object) with functions marked ``@hookimpl``, exposed through the
entry-point group ``slimfit_accel``::

    # pyproject.toml of your package
    [project.entry-points.slimfit_accel]
    my_scheduler = "my_package.my_scheduler"

There are two kinds of hooks:

* **Registration hooks** (``register_scorers``, ``register_schedulers``,
  ``register_compressors``) run once, when the plugin manager loads. A plugin calls
  ``register(name, factory)`` for each strategy it provides, so one plugin can add several.
  A config then names the strategy, e.g. ``scheduler: {name: ils, freeze_ratio: 0.9}``; the
  factory is called with the remaining keys as keyword arguments. Factories are usually
  dataclasses: their fields are validated (types, ``__post_init__`` checks) before training.
* **Observer hooks** (``slimfit_freeze_decision``, ``slimfit_step_end``) are called through
  pluggy once per optimizer step, for logging and analysis. All implementations are called;
  return values are ignored.

The strategy objects themselves are resolved once at start-up and then called directly, so the
per-step and per-tensor hot paths never go through pluggy dispatch. Their interfaces are the
``Scorer``, ``Scheduler`` and ``Compressor`` protocols below. Every answer a strategy gives is
validated (unknown unit names, wrong shapes, NaN scores) and an error names the plugin.

The built-ins are registered in code, not through the entry-point group; a plugin whose name,
or a strategy name it registers, is already taken (by a built-in or another plugin) is an error
naming both, never a silent replacement.

Copy ``strategies/scheduling/static.py`` for a minimal working example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping, Protocol, Sequence, runtime_checkable

import pluggy
import torch

PROJECT_NAME = "slimfit_accel"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

#: ``register(name, factory)``: the callback registration hooks receive.
Register = Callable[[str, Callable[..., Any]], None]


# --------------------------------------------------------------------------------------------
# Data handed to strategies
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitInfo:
    """A freezable unit as schedulers see it.

    ``name`` is the unit's name (a parameter name at ``tensor`` granularity, a module path at
    ``module``/``block`` granularity); ``index`` its position in model definition order (0 is
    nearest the input); ``block`` the index of the transformer block that holds it, or None for
    units outside the repeated blocks (embeddings, pooler, head); ``numel`` its element count.
    """

    name: str
    index: int
    block: int | None
    numel: int


@dataclass(frozen=True)
class ScheduleContext:
    """Everything a scheduler may base its decision on, for one optimizer step.

    ``scores`` maps every schedulable unit to its current score (higher means "train me";
    frozen units keep the score they had when last trained, units never trained yet have huge
    random scores). ``generator`` is a CPU ``torch.Generator`` seeded from ``(seed, step)``, so
    every rank draws the same numbers; use it for all randomness. ``total_steps`` is the planned
    number of optimizer steps, or None when unknown. ``last_trained`` maps each unit to the last
    step it was trained in (-1: never) and ``updates`` to how many steps it has been trained in,
    both as of the start of this step (empty when the caller does not track them).
    """

    step: int
    units: tuple[UnitInfo, ...]
    scores: Mapping[str, float]
    generator: torch.Generator
    seed: int
    total_steps: int | None = None
    last_trained: Mapping[str, int] = field(default_factory=dict)
    updates: Mapping[str, int] = field(default_factory=dict)


@dataclass
class UnitView:
    """This rank's view of one trained unit around an optimizer step.

    ``weights`` are the tensors the optimizer updates in place (the parameter itself on a single
    device or DDP, this rank's slice of the fp32 master partition under DeepSpeed ZeRO);
    ``grads`` are the matching gradients, available in ``Scorer.before_step`` only.
    """

    name: str
    weights: list[torch.Tensor]
    grads: list[torch.Tensor | None] = field(default_factory=list)


@dataclass(frozen=True)
class SavedTensorContext:
    """What the compression engine knows about a tensor autograd wants to save for backward.

    ``module_path``/``module_type`` name the innermost module running when it was saved;
    ``role`` is a hint where one can be told (e.g. ``"input"``), else None; ``frozen`` says
    whether that module's weights are frozen this step. ``module_kind`` says what the module
    computes, told from its parameters and children rather than its name (``activation``,
    ``relu``, ``norm``, ``mlp``, ``ffn_down``; empty when none applies; see
    ``slimfit_accel.compression.kinds``).
    """

    module_path: str
    module_type: str
    role: str | None
    frozen: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    module_kind: str = ""


# --------------------------------------------------------------------------------------------
# Strategy interfaces
# --------------------------------------------------------------------------------------------
@runtime_checkable
class Scorer(Protocol):
    """Scores the units trained in a step from what they did in it. Higher = train sooner.

    ``before_step`` is called just before the optimizer step with views of the units that will
    be trained (gradients are filled in); whatever it returns is handed back to ``after_step``,
    which runs just after the step and returns a 1-D float tensor with one score per view, in
    order, on any device. Keep only what you need between the two calls: scoring memory must
    grow with the units trained, not with the model. Do not call ``.item()``/``.cpu()``: the
    controller averages scores over ranks and moves them to the host once per step.
    """

    def before_step(self, views: Sequence[UnitView]) -> Any: ...

    def after_step(self, views: Sequence[UnitView], carried: Any) -> torch.Tensor: ...


@runtime_checkable
class Scheduler(Protocol):
    """Chooses which units to train in one optimizer step.

    ``select`` returns the names of the units to train (a subset of ``ctx.units``); every other
    schedulable unit is frozen for that step. It must be a pure function of ``ctx`` and the
    scheduler's own state, so every rank makes the same choice. A scheduler with state may add
    ``state_dict()``/``load_state_dict()``; the controller checkpoints it.

    Optional: ``never_trained(units: Sequence[UnitInfo]) -> Mapping[str, str]``, the units this
    scheduler can never select among ``units`` whatever their scores, each with why, in a short
    phrase (ILS with ``budget: parameters``: units larger than the step budget). SlimFit says so
    once at ``attach``, leaves them out of ``summary()``'s candidates and lists them in the
    report. Answers are checked (a mapping of known unit names to strings); leave it out when
    every unit can be picked.
    """

    def select(self, ctx: ScheduleContext) -> Collection[str]: ...


@runtime_checkable
class Compressor(Protocol):
    """Packs a tensor autograd saves for backward, and restores it when backward needs it.

    ``pack`` gets the tensor and its ``SavedTensorContext`` and returns any object (tensors in
    it are counted as the packed size); ``unpack`` returns a tensor of the original shape and
    dtype. The forward pass is never changed: only the copy kept for backward is compressed.
    """

    def pack(self, tensor: torch.Tensor, ctx: SavedTensorContext) -> Any: ...

    def unpack(self, packed: Any) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------
@hookspec
def register_scorers(register: Register) -> None:
    """Register scoring strategies.

    Called once when plugins load. Call ``register(name, factory)`` for each scorer; the factory
    receives the config's options as keyword arguments and returns a ``Scorer``.
    """


@hookspec
def register_schedulers(register: Register) -> None:
    """Register freeze-scheduling strategies.

    Called once when plugins load. Call ``register(name, factory)`` for each scheduler; the
    factory receives the config's options as keyword arguments and returns a ``Scheduler``.
    """


@hookspec
def register_compressors(register: Register) -> None:
    """Register activation compressors.

    Called once when plugins load. Call ``register(name, factory)`` for each compressor; the
    factory receives the config's options as keyword arguments and returns a ``Compressor``.
    """


@hookspec
def slimfit_freeze_decision(step: int, trainable: tuple[str, ...], frozen: tuple[str, ...]) -> None:
    """Observe the freeze decision for optimizer step ``step``.

    Called on every rank after the scheduler chose and before the forward pass. ``trainable``
    and ``frozen`` are unit names (units under ``always_train`` count as trainable).
    """


@hookspec
def slimfit_step_end(step: int, scores: Mapping[str, float]) -> None:
    """Observe the end of optimizer step ``step``.

    Called on every rank after the optimizer step and re-scoring; ``scores`` holds the new,
    rank-averaged scores of the units trained in that step.
    """
