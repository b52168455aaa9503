"""Moved to ``slimfit_accel.recipes.rotten_tomatoes`` (data lives with the recipes); kept as an alias."""

from slimfit_accel.recipes.rotten_tomatoes import (  # noqa: F401
    DATA_FILE,
    FEATURES,
    INSTALL_HINT,
    LABEL_NAMES,
    data_path,
    load_rotten_tomatoes,
    tokenize_splits,
)

__all__ = ["DATA_FILE", "FEATURES", "INSTALL_HINT", "LABEL_NAMES", "data_path", "load_rotten_tomatoes", "tokenize_splits"]
