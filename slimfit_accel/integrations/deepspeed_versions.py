"""The DeepSpeed releases the ZeRO backend is tested with, checked when the backend is built.

``ZeroStepBackend`` reads and patches DeepSpeed's private ZeRO internals (flat fp32 partitions,
``_hp_mapping`` fragments, ZeRO-3's name-mangled gradient partitions, DeepSpeedCPUAdam's C++
update), which change between releases, even patch releases (0.19.0 to 0.19.8 rewrote large
parts of both ZeRO optimizers). Outside the tested range freezing could silently stop being
exact, so the backend refuses to start there unless the user opts in.

The same range is declared in pyproject.toml's ``deepspeed`` and ``test`` extras.
"""

from __future__ import annotations

import os
import warnings

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from ..errors import IntegrationError

#: DeepSpeed versions the ZeRO backend's tests have passed with.
TESTED_DEEPSPEED = ">=0.19.8,<0.20"
#: Set to 1 to run an untested DeepSpeed anyway (with a warning instead of the error).
ALLOW_UNTESTED_ENV = "SLIMFIT_ACCEL_ALLOW_UNTESTED_DEEPSPEED"


def check_deepspeed_version(installed: str | None = None) -> None:
    """Raise ``IntegrationError`` (one line) if DeepSpeed ``installed`` (default: the imported
    one) is outside ``TESTED_DEEPSPEED``; only warn if ``SLIMFIT_ACCEL_ALLOW_UNTESTED_DEEPSPEED=1``."""
    if installed is None:
        import deepspeed

        installed = str(deepspeed.__version__)
    try:
        tested = SpecifierSet(TESTED_DEEPSPEED).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        tested = False
    if tested:
        return
    problem = (
        f"DeepSpeed {installed} is installed, but SlimFit's ZeRO backend is tested with deepspeed{TESTED_DEEPSPEED} "
        f"(it patches DeepSpeed internals that change between releases)"
    )
    if os.environ.get(ALLOW_UNTESTED_ENV, "") == "1":
        warnings.warn(f"{problem}; running it untested as {ALLOW_UNTESTED_ENV}=1 asks.", stacklevel=3)
        return
    raise IntegrationError(
        f"{problem}: pip install 'deepspeed{TESTED_DEEPSPEED}', or set {ALLOW_UNTESTED_ENV}=1 to run it untested."
    )
