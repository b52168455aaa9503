"""Third-party warnings that say nothing to a SlimFit user, silenced by the command-line tools.

peft, which transformers' training utilities import, imports bitsandbytes; on a CPU with
AVX-512 BF16, offline, bitsandbytes tries to fetch an optional 4-bit kernel at import and logs
two warnings about it ("Skipping publisher trust check", "Failed to load CPU gemm_4bit_forward")
that read like errors in a run that uses no 4-bit weights. Only our entry points call this;
importing the library changes no logger.
"""

from __future__ import annotations

import logging

#: Loggers whose import-time warnings are lowered to errors only.
IMPORT_NOISE_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


def quiet_import_noise() -> None:
    """Show only errors from ``IMPORT_NOISE_LOGGERS`` (call before transformers is imported)."""
    for name in IMPORT_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
