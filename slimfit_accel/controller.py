"""The per-step freeze loop: schedule -> requires_grad -> optimizer step -> re-score.

``FreezeController`` owns the score table (one float per schedulable unit, stale for frozen
units) and the step counter. It decides once per optimizer step, at the first forward of that
step (so a checkpoint loaded after ``attach`` decides where it left off, and observers never
hear of a step that is not trained), and re-scores the trained units right after the optimizer
step, with one collective and one host transfer. Its ``state_dict`` (step, scores, strategy
state) goes into ``accelerator.save_state`` so a resumed run continues the same freeze sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .errors import PluginError
from .hookspecs import ScheduleContext, UnitView
from .plugins import Built, StrategyRegistry, call_observers
from .rng import derived_generator
from .row_units import RowLayout
from .stepping import StepBackend
from .units import UnitSet

#: Units never trained get scores above anything a scorer returns, so each is trained once
#: (in a seeded random order) before any is trained twice.
UNTRAINED_SCORE = 1e30


@dataclass
class FreezeStats:
    """What the controller has done so far, for the report."""

    steps: int = 0
    trained_steps: dict[str, int] = field(default_factory=dict)
    trainable_fraction_sum: float = 0.0  # of schedulable elements, summed over steps

    @property
    def mean_trainable_fraction(self) -> float:
        return self.trainable_fraction_sum / self.steps if self.steps else 0.0


class FreezeController:
    """Applies a scheduler's per-step decision and feeds the scorer. See module docstring."""

    def __init__(
        self,
        units: UnitSet,
        scorer: Built,
        scheduler: Built,
        registry: StrategyRegistry,
        seed: int = 0,
        total_steps: int | None = None,
        lr_scale: float = 1.0,
        rows: RowLayout | None = None,
    ):
        self.units = units
        self.rows = rows  # row units of split matrices: the backend steps only their trained rows
        self.lr_scale = lr_scale
        self.scorer = scorer
        self.scheduler = scheduler
        self.registry = registry
        self.seed = seed
        self.total_steps = total_steps
        self.step = 0
        self._infos = tuple(u.info for u in units.schedulable)
        self._by_name = {u.name: u for u in units.schedulable}
        self._always = {u.name for u in units.always_trained}
        self._position = {u.name: i for i, u in enumerate(units.schedulable)}
        self.scores = UNTRAINED_SCORE * (1 + torch.rand(len(self._infos), generator=derived_generator(seed), dtype=torch.float64))
        self.trainable: tuple[str, ...] = ()
        self.stats = FreezeStats(trained_steps={u.name: 0 for u in units.schedulable})
        self.last_trained = {u.name: -1 for u in units.schedulable}  # step a unit last trained in
        self.backend: StepBackend | None = None
        self._decided_for: int | None = None
        self._checked: tuple[int, set[str]] | None = None  # (step, choice) validated at bind
        self._views: list[UnitView] = []
        self._carried: Any = None
        self.last_snapshot_bytes = 0
        self._numel = {u.name: u.numel for u in units.schedulable}
        self._total_numel = sum(self._numel.values())

    # -- wiring ----------------------------------------------------------------------------
    def bind(self, backend: StepBackend) -> None:
        """Run the scorer around the backend's real optimizer steps.

        The scheduler is asked for the current step now, so its errors surface before training;
        the answer is applied (and announced) only when that step begins.
        """
        self.backend = backend
        # Each unit sits out most steps, so it takes larger steps when it trains (``lr_scale``):
        # the backend scales the rates for the length of each update only.
        backend.install(before_step=self._before_optimizer_step, after_step=self._after_optimizer_step, lr_scale=self.lr_scale)
        self._checked = (self.step, self._select())

    def decide_next(self, chosen: set[str]) -> None:
        """Train ``chosen`` (schedulable unit names) at the current step instead of asking the
        scheduler: the memory planner's extra step (``estimate.first_gradients_draw``)."""
        unknown = sorted(set(chosen) - self._by_name.keys())
        if unknown:
            raise ValueError(f"decide_next: unknown unit names {unknown[:5]}")
        self._checked = (self.step, set(chosen))

    def unbind(self) -> None:
        if self.backend is not None:
            self.backend.remove()
            self.backend = None

    # -- the step --------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Apply the current optimizer step's decision, made (and announced) once per step;
        every micro-batch of the step calls this and reuses it."""
        # A scorer snapshot left by a step that raised (out of memory, say) is not carried on.
        self._views, self._carried = [], None
        if self._decided_for != self.step:
            checked, self._checked = self._checked, None
            chosen = checked[1] if checked is not None and checked[0] == self.step else self._select()
            self.trainable = tuple(u.name for u in self.units.schedulable if u.name in chosen)
            frozen_units = [u for u in self.units.schedulable if u.name not in chosen]
            if self.backend is not None:
                # A parameter shared by units (row units of one matrix) is frozen only when none trains.
                trained = {id(p) for u in self.units.all if u.name in chosen or u.name in self._always for p in u.params}
                frozen = {id(p): p for u in frozen_units for p in u.params if id(p) not in trained}
                self.backend.set_frozen(list(frozen.values()))
            if self.rows is not None:
                self.rows.select(set(chosen) | self._always)
            self._decided_for = self.step
            call_observers(
                self.registry,
                "slimfit_freeze_decision",
                step=self.step,
                trainable=self.trainable + tuple(u.name for u in self.units.always_trained),
                frozen=tuple(u.name for u in frozen_units),
            )
        trainable = set(self.trainable)
        for unit in self.units.schedulable:
            for param in unit.params:
                param.requires_grad_(False)
        for unit in self.units.schedulable:
            if unit.name in trainable:  # a matrix trains when any of its row units does
                for param in unit.params:
                    param.requires_grad_(True)
        for unit in self.units.always_trained:
            for param in unit.params:
                param.requires_grad_(True)

    def end_step(self) -> None:
        """Every unit trainable again once the micro-batch's backward is done.

        Between steps the model shows its real trainable set, so whatever reads
        ``requires_grad`` then (checkpoint writers and readers, DeepSpeed's
        ``safe_get_full_fp32_param``, parameter counts) is not misled by one step's decision.
        The backend keeps the frozen set until the next decision, so an optimizer step taken
        after the block is still freeze-true.
        """
        for unit in self.units.all:
            for param in unit.params:
                param.requires_grad_(True)

    def _select(self) -> set[str]:
        scores = dict(zip((i.name for i in self._infos), self.scores.tolist()))
        ctx = ScheduleContext(
            step=self.step,
            units=self._infos,
            scores=scores,
            generator=derived_generator(self.seed, self.step),
            seed=self.seed,
            total_steps=self.total_steps,
            last_trained=dict(self.last_trained),
            updates=dict(self.stats.trained_steps),
        )
        plugin = self.scheduler.registration.plugin
        try:
            chosen = self.scheduler.strategy.select(ctx)
        except Exception as err:
            raise PluginError(plugin, f"{self.scheduler.label} raised at step {self.step}: {type(err).__name__}: {err}") from err
        if isinstance(chosen, str) or not hasattr(chosen, "__iter__"):
            raise PluginError(plugin, f"{self.scheduler.label} must return a collection of unit names, got {type(chosen).__name__}")
        chosen = set(chosen)
        unknown = sorted(str(n) for n in chosen - self._by_name.keys())
        if unknown:
            raise PluginError(
                plugin,
                f"{self.scheduler.label} returned unknown unit names at step {self.step}: "
                f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''} (known units look like {self._infos[0].name!r})",
            )
        if not chosen and self._infos:
            # Every unit frozen would train only the always-trained parameters (biases, norms,
            # head) while looking like a SlimFit step: almost always a scheduler bug.
            raise PluginError(
                plugin,
                f"{self.scheduler.label} selected no unit to train at step {self.step} (all "
                f"{len(self._infos)} schedulable units frozen); a scheduler must return at least one unit name",
            )
        return chosen

    def _before_optimizer_step(self) -> None:
        units = [self._by_name[name] for name in self.trainable]
        views = self.backend.views([(u.name, u.params) for u in units])
        if self.rows is not None:  # a row unit is seen as its rows
            views = [self.rows.narrow(view) for view in views]
        try:
            self._carried = self.scorer.strategy.before_step(views)
        except Exception as err:
            raise PluginError(self.scorer.registration.plugin, f"{self.scorer.label} raised in before_step: {type(err).__name__}: {err}") from err
        # Gradients are for before_step only: holding them would keep them alive through a
        # step that releases them as it goes (optimizer paging).
        self._views = [UnitView(name=v.name, weights=v.weights) for v in views]
        self.last_snapshot_bytes = tensor_bytes(self._carried)

    def _after_optimizer_step(self) -> None:
        views, carried = self._views, self._carried
        self._views, self._carried = [], None
        if views:
            self._update_scores(views, carried)
        self.stats.steps += 1
        for name in self.trainable:
            self.stats.trained_steps[name] += 1
            self.last_trained[name] = self.step
        if self._total_numel:
            self.stats.trainable_fraction_sum += sum(self._numel[n] for n in self.trainable) / self._total_numel
        self.step += 1

    def _update_scores(self, views: Sequence[UnitView], carried: Any) -> None:
        plugin = self.scorer.registration.plugin
        try:
            local = self.scorer.strategy.after_step(views, carried)
        except Exception as err:
            raise PluginError(plugin, f"{self.scorer.label} raised in after_step: {type(err).__name__}: {err}") from err
        if not isinstance(local, torch.Tensor) or tuple(local.shape) != (len(views),):
            shape = tuple(local.shape) if isinstance(local, torch.Tensor) else type(local).__name__
            raise PluginError(plugin, f"{self.scorer.label} must return a tensor of shape ({len(views)},), got {shape}")
        # Under ZeRO a rank may hold a slice (or nothing) of a unit: combine the ranks' means
        # weighted by element count, which is exact for per-element means.
        counts = torch.tensor([float(sum(w.numel() for w in v.weights)) for v in views], dtype=torch.float64)
        local = local.detach().to(torch.float64)
        counts = counts.to(local.device)
        weighted = torch.stack([torch.where(counts > 0, local * counts, torch.zeros_like(local)), counts])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "gloo" and weighted.device.type != "cpu":
                weighted = weighted.cpu()
            dist.all_reduce(weighted)
        summed = weighted.cpu()  # the one host transfer of the step
        new_scores = summed[0] / summed[1].clamp_min(1.0)
        bad = [v.name for v, s in zip(views, new_scores.tolist()) if not math.isfinite(s)]
        if bad:
            raise PluginError(plugin, f"{self.scorer.label} returned non-finite scores at step {self.step} for {bad[:5]}")
        index = torch.tensor([self._position[v.name] for v in views])
        had_elements = summed[1] > 0
        self.scores[index[had_elements]] = new_scores[had_elements]
        call_observers(
            self.registry,
            "slimfit_step_end",
            step=self.step,
            scores={v.name: float(s) for v, s in zip(views, new_scores.tolist())},
        )

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "units": [i.name for i in self._infos],
            "scores": self.scores.clone(),
            "trained_steps": dict(self.stats.trained_steps),
            "last_trained": dict(self.last_trained),
            "trainable_fraction_sum": self.stats.trainable_fraction_sum,
            "scheduler": _strategy_state(self.scheduler.strategy),
            "scorer": _strategy_state(self.scorer.strategy),
            "backend": self.backend.state_dict() if self.backend is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [i.name for i in self._infos]
        if state["units"] != names:
            raise PluginError("slimfit_accel", "checkpoint was saved for a different set of units; use the same model and units config")
        self.step = int(state["step"])
        self.scores = state["scores"].clone().to(torch.float64)
        self.stats.trained_steps = dict(state["trained_steps"])
        self.last_trained = dict(state.get("last_trained", {n: -1 for n in names}))
        self.stats.steps = self.step
        self.stats.trainable_fraction_sum = float(state["trainable_fraction_sum"])
        for key, strategy in (("scheduler", self.scheduler.strategy), ("scorer", self.scorer.strategy)):
            if state.get(key) and hasattr(strategy, "load_state_dict"):
                strategy.load_state_dict(state[key])
        if self.backend is not None and state.get("backend"):
            self.backend.load_state_dict(state["backend"])
        # The next step() decides for the loaded step; nothing is applied or announced before.
        self._decided_for = None
        self._checked = None


def _strategy_state(strategy: Any) -> Any:
    return strategy.state_dict() if hasattr(strategy, "state_dict") else None


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors in a (nested) list/tuple/dict: what a scorer keeps."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0
