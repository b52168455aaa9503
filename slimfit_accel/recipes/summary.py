"""``OUTPUT/summary.json``: what a run did, in one file to compare runs by.

Metrics per epoch, memory by category, step time, freeze statistics, the package versions and
the configuration (flags and SlimFit config) that produced them.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("slimfit-accel", "torch", "transformers", "accelerate", "datasets", "deepspeed", "peft")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**summary, "versions": package_versions()}, indent=2, default=str))
