"""Units the scheduler can never pick: asked once, checked, and said plainly.

A scheduler may know that some units never win, whatever their scores: ILS with ``budget:
parameters`` never trains a unit larger than the whole step budget (MiniLM's word embeddings
are half its parameters). Those units keep their loaded weights for the whole run, so SlimFit
says so at ``attach``, leaves them out of ``summary()``'s candidates and lists them in the report.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from .errors import PluginError
from .plugins import Built
from .units import Unit

#: How many units the start-up line names before "and N more".
NAMED = 3


def never_trained(scheduler: Built, units: Sequence[Unit]) -> dict[str, str]:
    """The scheduler's ``never_trained`` answer (unit name -> why), checked, in model order.

    Empty when the scheduler does not implement the optional method (hookspecs.Scheduler).
    """
    ask = getattr(scheduler.strategy, "never_trained", None)
    if ask is None:
        return {}
    plugin = scheduler.registration.plugin
    try:
        answer = ask(tuple(u.info for u in units))
    except Exception as err:
        raise PluginError(plugin, f"{scheduler.label} raised in never_trained: {type(err).__name__}: {err}") from err
    if not isinstance(answer, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in answer.items()):
        raise PluginError(
            plugin, f"{scheduler.label} never_trained must return a mapping of unit name to reason (str), got {answer!r:.200}"
        )
    names = {u.name for u in units}
    unknown = sorted(set(answer) - names)
    if unknown:
        raise PluginError(plugin, f"{scheduler.label} never_trained returned unknown unit names: {unknown[:5]}")
    return {u.name: answer[u.name] for u in units if u.name in answer}


def startup_message(scheduler: Built, never: Mapping[str, str], units: Sequence[Unit], total_params: int) -> str:
    """One line: which units never train, their share of the model, why, and what to do."""
    numel = {u.name: u.numel for u in units}
    held = sum(numel[name] for name in never)
    share = 100.0 * held / total_params if total_params else 0.0
    named = "; ".join(f"{name} ({why})" for name, why in list(never.items())[:NAMED])
    more = f"; and {len(never) - NAMED} more" if len(never) > NAMED else ""
    return (
        f"SlimFit: {scheduler.label} can never train {len(never)} unit(s) holding {held:,d} parameters "
        f"({share:.1f}% of the model), which keep their loaded weights for the whole run: {named}{more}. "
        f"To train them, lower the scheduler's freeze_ratio or list them in units.always_train; to leave them "
        f"as loaded on purpose, set requires_grad=False on them before prepare_model."
    )
