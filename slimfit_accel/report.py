"""The SlimFit report: what was frozen and trained, as data and as a readable table."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from .controller import FreezeController
from .memory import MemoryReport, format_bytes


@dataclass
class SlimFitReport:
    """Freeze statistics after ``steps`` optimizer steps, and memory by category.

    ``mean_trainable_fraction`` is the average share of schedulable elements trained per step;
    ``trained_steps`` counts, per unit, the steps it was trained in. ``never_trainable`` names
    the units the scheduler can never pick (unit -> why, e.g. larger than ILS's step budget):
    they keep their loaded weights, and ``never_trainable_params`` counts their parameters.
    """

    steps: int
    scorer: str
    scheduler: str
    schedulable_units: int
    always_trained_units: int
    trainable_units_last_step: int
    mean_trainable_fraction: float
    never_trained_units: int
    trained_steps: dict[str, int] = field(default_factory=dict)
    scoring_snapshot_bytes_last_step: int = 0
    memory: MemoryReport | None = None
    never_trainable: dict[str, str] = field(default_factory=dict)
    never_trainable_params: int = 0
    memory_note: str = ""  # why ``memory`` is None (the meter was off), said in ``render``

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self, width: int = 100) -> str:
        """A plain-text table for logs and terminals."""
        table = Table(title="SlimFit freezing", show_header=True, header_style="bold")
        table.add_column("statistic")
        table.add_column("value", justify="right")
        rows = [
            ("optimizer steps", f"{self.steps}"),
            ("scorer / scheduler", f"{self.scorer} / {self.scheduler}"),
            ("schedulable units", f"{self.schedulable_units}"),
            ("always-trained units", f"{self.always_trained_units}"),
            ("units trained at the last step", f"{self.trainable_units_last_step}"),
            ("frozen at the last step", f"{self.schedulable_units - self.trainable_units_last_step}"),
            ("mean trainable share of unit weights", f"{self.mean_trainable_fraction:.1%}"),
            ("units never trained", f"{self.never_trained_units}"),
            ("scorer snapshot, last step", format_bytes(self.scoring_snapshot_bytes_last_step)),
        ]
        if self.never_trainable:
            rows.append(("units the scheduler can never pick", f"{len(self.never_trainable)} ({self.never_trainable_params:,d} params)"))
        if self.trained_steps:
            counts = sorted(self.trained_steps.values())
            rows.append(("steps trained per unit (min / median / max)", f"{counts[0]} / {counts[len(counts) // 2]} / {counts[-1]}"))
        for row in rows:
            table.add_row(*row)
        out = io.StringIO()
        Console(file=out, width=width, force_terminal=False, color_system=None).print(table)
        text = out.getvalue() + "".join(
            f"never trained (the scheduler cannot pick it): {name}: {why}\n" for name, why in self.never_trainable.items()
        )
        if self.memory is None:
            return text + (f"{self.memory_note}\n" if self.memory_note else "")
        return text + self.memory.render(width)


def build_report(
    controller: FreezeController, memory: MemoryReport | None = None, never_trainable: dict[str, str] | None = None,
    memory_note: str = "",
) -> SlimFitReport:
    stats = controller.stats
    never_trainable = dict(never_trainable or {})
    numel = {u.name: u.numel for u in controller.units.schedulable}
    return SlimFitReport(
        steps=stats.steps,
        scorer=controller.scorer.registration.name,
        scheduler=controller.scheduler.registration.name,
        schedulable_units=len(controller.units.schedulable),
        always_trained_units=len(controller.units.always_trained),
        trainable_units_last_step=len(controller.trainable),
        mean_trainable_fraction=stats.mean_trainable_fraction,
        never_trained_units=sum(1 for n in stats.trained_steps.values() if n == 0),
        trained_steps=dict(stats.trained_steps),
        scoring_snapshot_bytes_last_step=controller.last_snapshot_bytes,
        memory=memory,
        never_trainable=never_trainable,
        never_trainable_params=sum(numel[name] for name in never_trainable),
        memory_note=memory_note,
    )
