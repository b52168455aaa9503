"""``slimfit-accel``: fine-tune, list plugins and check configs from the shell.

    slimfit-accel finetune --train-file data.csv --model ./my-bert --output-dir runs/mine
    slimfit-accel plugins [--json]
    slimfit-accel check-config my_slimfit.yaml [--model ./my-bert] [--task text|image]
    slimfit-accel estimate --model ./my-llama --seq-len 2048 --batch 2 [--budget 24GiB --write-config fit.yaml] [--json]
    slimfit-accel --version
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from .errors import SlimFitError
from .quiet import quiet_import_noise

quiet_import_noise()  # before the estimate's LoRA arm imports peft (see quiet.py)

#: Steps assumed by ``check-config`` for schedulers that follow training progress.
CHECK_TOTAL_STEPS = 100


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["finetune"]:  # the recipe parses its own flags
        from .finetune import cli

        try:
            cli(argv[1:])
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
        return 0
    from . import __version__

    parser = argparse.ArgumentParser(prog="slimfit-accel", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"slimfit-accel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("finetune", help="fine-tune a classifier or a causal LM (SFT) with SlimFit (see: slimfit-accel finetune --help)")
    plugins = commands.add_parser("plugins", help="list loaded plugins, their strategies and hooks")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    check = commands.add_parser("check-config", help="validate a SlimFit YAML config, and its first decision on a model")
    check.add_argument("config", help="path of the YAML file")
    check.add_argument("--model", help="a model folder (config.json): units are found in it (no weights are loaded) "
                                       "and the scheduler makes its first decision")
    check.add_argument("--task", choices=("text", "image"), help="the model's task (default: from its config)")
    estimate = commands.add_parser("estimate", help="device memory of fine-tuning arms from a model's config.json (no weights), "
                                                    "and the SlimFit config that fits a budget")
    estimate.add_argument("--model", required=True, help="a folder with config.json (weights are not read)")
    estimate.add_argument("--seq-len", type=int, required=True)
    estimate.add_argument("--batch", type=int, required=True)
    estimate.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    estimate.add_argument("--task", choices=("causal-lm", "classification"), help="default: from the config's architectures")
    estimate.add_argument("--slimfit-config", help="YAML the SlimFit arms start from (default: the packaged sft.yaml for a causal LM, demo.yaml for a classifier)")
    estimate.add_argument("--freeze-ratio", type=float, default=0.9, help="slimfit_best's freeze ratio")
    estimate.add_argument("--arms", nargs="+", help="subset of the arms (default: all)")
    estimate.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                          help="where paging streams: cuda prefetches a second chunk; cpu matches a measurement on CPU")
    estimate.add_argument("--budget", help="device memory to fit, e.g. 24GiB: prints (and with --write-config writes) the SlimFit config")
    estimate.add_argument("--write-config", help="where to write the chosen config as YAML (with --budget)")
    estimate.add_argument("--json", action="store_true", help="the whole table as JSON on stdout")
    estimate.add_argument("--jobs", type=int, default=None,
                          help="arms estimated at once, each in its own process (default: one per CPU core)")
    args = parser.parse_args(argv)
    try:
        if args.command == "plugins":
            return _plugins(args.json)
        if args.command == "estimate":
            return _estimate(args)
        return _check_config(args.config, args.model, args.task)
    except SlimFitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader stopped early (`| head`): no traceback. Point stdout at devnull so Python's
        # final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _estimate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import estimate as planner
    from .errors import ConfigError

    if args.write_config and not args.budget:
        raise ConfigError("--write-config needs --budget: the config written is the one chosen to fit it")
    base = None
    if args.slimfit_config:
        from .slimfit import SlimFit

        SlimFit.from_config(args.slimfit_config)  # a bad file or strategy name fails here, before any arm runs
        import yaml

        base = yaml.safe_load(Path(args.slimfit_config).read_text()) or {}
    setup = planner.Setup(Path(args.model), seq_len=args.seq_len, batch=args.batch, precision=args.precision, task=args.task,
                          slimfit_config=base, freeze_ratio=args.freeze_ratio, device=args.device).load()
    log = (lambda line: print(line, file=sys.stderr, flush=True))
    if args.budget:
        budget = planner.parse_size(args.budget)
        weights = planner.weight_bytes(setup)
        if weights >= budget:
            raise ConfigError(f"--budget {args.budget}: the weights alone take {planner.format_gib(weights)} "
                              f"(matrices in int8, the rest {args.precision}); no SlimFit config fits: use a bigger GPU")
        choice = planner.fit_budget(setup, budget, progress=None if args.json else log)
        if args.json:
            print(json.dumps({"budget_bytes": budget, "rung": choice.rung, "config": choice.config,
                              "estimate": planner.asdict(choice.estimate), "tried": choice.tried}, indent=2))
        else:
            print(f"fits {planner.format_gib(budget)}: {choice.rung} -> {planner.format_gib(choice.estimate.device_total)} "
                  f"+ {planner.format_gib(planner.CUDA_RESERVE)} CUDA context")
            print("rule: the first config of the ladder (base, as the recipe runs it; + optimizer paging; + fp32 masters on "
                  "host; + every block checkpointed; + chunked loss, 256 tokens a chunk; + optimizer step in backward, "
                  "input_embedding: auto; + freeze_ratio 0.9/0.95; + "
                  "frozen weights in int8; + freeze_ratio 0.98) whose estimated device total fits")
            import yaml

            print(yaml.safe_dump(choice.config, sort_keys=False), end="")
            never = planner.never_trained_units(setup, choice.config)
            if never:
                print(f"note: {len(never)} units never train with it (larger than a step's budget), they keep their "
                      f"loaded weights: {', '.join(never[:4])}{' ...' if len(never) > 4 else ''}")
        if args.write_config:
            planner.write_config(choice.config, Path(args.write_config),
                                 header=f"# slimfit-accel estimate: fits {args.budget} at batch {args.batch} x {args.seq_len}, {args.precision} ({choice.rung})")
            if not args.json:
                print(f"wrote {args.write_config}")
        return 0
    results = planner.estimate(setup, args.arms, progress=None if args.json else log, jobs=args.jobs)
    print(json.dumps(planner.to_json(setup, results), indent=2) if args.json else planner.render(setup, results))
    return 0


def _plugins(as_json: bool) -> int:
    from .plugins import StrategyRegistry

    rows = StrategyRegistry.load().describe()
    if as_json:
        print(json.dumps(rows, indent=2), flush=True)
        return 0
    for row in rows:
        kind = "built-in" if row["builtin"] else "third-party"
        print(f"{row['name']}  ({kind}, {row['module']})")
        for strategy_kind, names in row["strategies"].items():
            print(f"    {strategy_kind}: {', '.join(names)}")
        print(f"    hooks: {', '.join(row['hooks'])}")
    sys.stdout.flush()
    return 0


def _check_config(path: str, model_path: str | None, task: str | None) -> int:
    from .never_trained import never_trained
    from .slimfit import SlimFit

    slimfit = SlimFit.from_config(path)
    message = f"{path}: OK (scorer {slimfit.scorer.registration.name}, scheduler {slimfit.scheduler.registration.name})"
    if model_path:
        model = _skeleton_model(model_path, task)
        slimfit.prepare_model(model)
        units = slimfit.units
        message += f"; {len(units.schedulable)} schedulable and {len(units.always_trained)} always-trained units in {type(model).__name__}"
        never = never_trained(slimfit.scheduler, units.schedulable)
        if never:
            names = ", ".join(list(never)[:3]) + (" ..." if len(never) > 3 else "")
            message += f"; {len(never)} the scheduler can never pick, which keep their loaded weights: {names}"
        message += f"; {_first_decision(slimfit)}"
    print(message)
    return 0


def _first_decision(slimfit) -> str:
    """Run the scheduler's decision for step 0 on the real units, as training would."""
    from .controller import FreezeController

    controller = FreezeController(slimfit.units, slimfit.scorer, slimfit.scheduler, slimfit.registry,
                                  seed=slimfit.config.seed, total_steps=CHECK_TOTAL_STEPS)
    controller.begin_step()
    numel = {u.name: u.numel for u in slimfit.units.schedulable}
    share = sum(numel[n] for n in controller.trainable) / max(sum(numel.values()), 1)
    return (f"step 0 trains {len(controller.trainable)} of {len(numel)} schedulable units "
            f"({share:.0%} of their weights) plus {len(slimfit.units.always_trained)} always-trained")


def _skeleton_model(model_path: str, task: str | None):
    """The model's architecture on the meta device: unit patterns are checked without weights."""
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

    from .errors import ConfigError

    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise ConfigError(f"--model {model_path}: no config.json there; pass a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(model_path)
    except Exception as err:
        raise ConfigError(f"--model {model_path}: cannot read a transformers config.json there ({err})") from None
    if task is None:
        from .recipes.tasks import model_task

        task = model_task(model_path)
    auto = AutoModelForImageClassification if task == "image" else AutoModelForSequenceClassification
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except ValueError as err:
        raise ConfigError(f"--model {model_path}: {type(config).__name__} has no {task} classifier ({str(err).splitlines()[0]})") from None


if __name__ == "__main__":
    sys.exit(main())
