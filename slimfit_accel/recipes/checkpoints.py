"""Checkpoints the recipe can resume from: ``accelerator.save_state`` plus where training was.

``OUTPUT/checkpoints/step_000040/`` holds the model, optimizer, learning-rate schedule, random
states and SlimFit's freeze controller (Accelerate's files), and ``recipe_state.json``: the
optimizer step, the epoch, the micro-batches already taken from it, and the freeze timeline so
far. Resuming loads the state, skips those batches of that epoch's (seeded) order, and continues:
the same batches, freeze decisions and final weights as a run that was never interrupted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import RecipeError

STATE_FILE = "recipe_state.json"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:06d}"


def resolve_resume(value: str, output_dir: str | None) -> Path:
    """The checkpoint folder ``--resume-from-checkpoint`` names (``latest``: the newest under OUTPUT)."""
    if value == "latest":
        if output_dir is None:
            raise RecipeError("--resume-from-checkpoint latest needs --output-dir (the run whose checkpoints to use)")
        found = sorted((Path(output_dir) / "checkpoints").glob("step_*/" + STATE_FILE))
        if not found:
            raise RecipeError(f"--resume-from-checkpoint latest: no checkpoint under {Path(output_dir) / 'checkpoints'}")
        return found[-1].parent
    folder = Path(value)
    if not (folder / STATE_FILE).is_file():
        raise RecipeError(f"--resume-from-checkpoint {value}: not a recipe checkpoint (no {STATE_FILE}); pass OUTPUT/checkpoints/step_N or 'latest'")
    return folder


def save_checkpoint(accelerator, folder: Path, state: dict[str, Any]) -> None:
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / STATE_FILE).write_text(json.dumps(state))
    accelerator.wait_for_everyone()


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / STATE_FILE).read_text())
