"""The packaged SlimFit configs: ``demo`` (the default: classification) and ``sft`` (the default
for supervised fine-tuning of a decoder), plus model configs for the planner in ``models/``."""

from __future__ import annotations

from importlib import resources

PACKAGED_CONFIGS = ("demo", "sft")


def packaged_config(name: str) -> str:
    """The path of a packaged config, e.g. ``SlimFitCallback(packaged_config("sft"))`` with TRL."""
    if name not in PACKAGED_CONFIGS:
        raise ValueError(f"no packaged SlimFit config {name!r}; packaged: {', '.join(PACKAGED_CONFIGS)}")
    return str(resources.files(__name__) / f"{name}.yaml")
