"""The fine-tuning recipe's parts: data sources, tasks (text and image classification),
evaluation, checkpoints, and side-by-side comparison. The core library never imports these;
``slimfit_accel/finetune.py`` reads top to bottom and calls them.
"""

from __future__ import annotations

from slimfit_accel.errors import SlimFitError


class RecipeError(SlimFitError, ValueError):
    """A recipe input (flag, model folder, data file, column) is unusable. Raised before training."""
