"""``slimfit-accel``: list plugins and check configs from the shell.

    slimfit-accel plugins [--json]
    slimfit-accel check-config my_slimfit.yaml [--model ./my-bert]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .errors import SlimFitError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimfit-accel", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plugins = commands.add_parser("plugins", help="list loaded plugins, their strategies and hooks")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    check = commands.add_parser("check-config", help="validate a SlimFit YAML config")
    check.add_argument("config", help="path of the YAML file")
    check.add_argument("--model", help="a model folder (config.json) to check unit patterns against; no weights are loaded")
    args = parser.parse_args(argv)
    try:
        if args.command == "plugins":
            return _plugins(args.json)
        return _check_config(args.config, args.model)
    except SlimFitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _plugins(as_json: bool) -> int:
    from .plugins import StrategyRegistry

    rows = StrategyRegistry.load().describe()
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        kind = "built-in" if row["builtin"] else "third-party"
        print(f"{row['name']}  ({kind}, {row['module']})")
        for strategy_kind, names in row["strategies"].items():
            print(f"    {strategy_kind}: {', '.join(names)}")
        print(f"    hooks: {', '.join(row['hooks'])}")
    return 0


def _check_config(path: str, model_path: str | None) -> int:
    from .slimfit import SlimFit

    slimfit = SlimFit.from_config(path)
    message = f"{path}: OK (scorer {slimfit.scorer.registration.name}, scheduler {slimfit.scheduler.registration.name})"
    if model_path:
        model = _skeleton_model(model_path)
        slimfit.prepare_model(model)
        units = slimfit.units
        message += f"; {len(units.schedulable)} schedulable and {len(units.always_trained)} always-trained units in {type(model).__name__}"
    print(message)
    return 0


def _skeleton_model(model_path: str):
    """The model's architecture on the meta device: unit patterns are checked without weights."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from .errors import ConfigError

    try:
        config = AutoConfig.from_pretrained(model_path)
    except Exception as err:
        raise ConfigError(f"--model {model_path}: cannot read a transformers config.json there ({err})") from None
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


if __name__ == "__main__":
    sys.exit(main())
