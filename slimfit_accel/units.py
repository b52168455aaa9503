"""Finding the freezable units of any ``nn.Module``.

A unit is what the scheduler freezes or trains as one: a weight tensor (``tensor``, SlimFit's
default), the weights of one layer (``module``) or a whole transformer block (``block``).
Transformer blocks are found structurally (a ``ModuleList`` of two or more modules of one type
that hold parameters: ``bert.encoder.layer``, ``transformer.h``, ``model.layers``...), so no
architecture is special-cased.

Example::

    units = discover_units(model, UnitsConfig(always_train=["classifier.*"]))
    [u.name for u in units.schedulable][:2]   # ['bert.embeddings.word_embeddings.weight', ...]
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase

from torch import nn

from .config import RowChunksConfig, UnitsConfig
from .errors import ConfigError
from .hookspecs import UnitInfo


@dataclass(frozen=True)
class Unit:
    """A freezable unit: its name, parameters (with their names) and position in the model."""

    name: str
    params: tuple[nn.Parameter, ...]
    param_names: tuple[str, ...]
    index: int
    block: int | None
    #: For a row unit (``units.row_chunks``): the range [start, stop) of its one parameter's rows.
    rows: tuple[int, int] | None = None

    @property
    def numel(self) -> int:
        if self.rows is not None:
            shape = full_shape(self.params[0])
            return (self.rows[1] - self.rows[0]) * math.prod(shape[1:])
        return sum(full_numel(p) for p in self.params)

    @property
    def info(self) -> UnitInfo:
        return UnitInfo(name=self.name, index=self.index, block=self.block, numel=self.numel)

    def matches(self, pattern: str) -> bool:
        return fnmatchcase(self.name, pattern) or any(fnmatchcase(n, pattern) for n in self.param_names)


@dataclass(frozen=True)
class ParameterSummary:
    """Parameter counts: PEFT's ``print_trainable_parameters`` numbers plus SlimFit's split.

    ``trainable``: parameters with ``requires_grad`` after ``prepare_model`` (PEFT's "trainable
    params"); ``candidates``: those in units the scheduler picks from; ``never_trained``: those in
    units it can never pick (e.g. larger than ILS's step budget), which keep their loaded
    weights; ``always_trained``: the rest of ``trainable`` (``always_train`` units, biases, norm
    shifts); ``trained_this_step``: ``always_trained`` plus the units picked for the current
    step. ``str()`` gives one line; percentages are of all parameters, as PEFT's are.
    """

    total: int
    trainable: int
    candidates: int
    always_trained: int
    trained_this_step: int
    never_trained: int = 0

    def percent(self, count: int) -> float:
        return 100.0 * count / self.total if self.total else 0.0

    def __str__(self) -> str:
        counts = [("SlimFit candidates", self.candidates)]
        if self.never_trained:
            counts.append(("never trained (the scheduler cannot pick them)", self.never_trained))
        counts += [("always trained", self.always_trained), ("trained this step", self.trained_this_step)]
        parts = [
            f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent(self.trainable):.4f}",
            *(f"{label}: {count:,d} ({self.percent(count):.4f}%)" for label, count in counts),
        ]
        return " || ".join(parts)


@dataclass(frozen=True)
class UnitSet:
    """The units of a model: ``schedulable`` ones (the scheduler decides) and ``always_trained``."""

    schedulable: tuple[Unit, ...]
    always_trained: tuple[Unit, ...]

    @property
    def all(self) -> tuple[Unit, ...]:
        return self.schedulable + self.always_trained


def discover_units(model: nn.Module, config: UnitsConfig) -> UnitSet:
    """Group the model's candidate parameters into units, as ``config`` says.

    With ``candidates: trainable`` (the default) a parameter is a candidate only if it has
    ``requires_grad`` now: what the user froze (a PEFT base model) is never made a unit.
    Raises ``ConfigError`` when a pattern matches nothing or no unit is left to schedule.
    """
    model_name = type(model).__name__
    all_names = [name for name, _ in model.named_parameters()]
    _check_patterns("units.include", config.include, all_names, model_name, "parameter")
    _check_patterns("units.exclude", config.exclude, all_names, model_name, "parameter")

    owner_of = _owning_modules(model)
    block_of = _block_index(model)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    blocks: dict[str, int | None] = {}
    user_frozen: list[str] = []
    for name, param in model.named_parameters():
        if not any(fnmatchcase(name, p) for p in config.include):
            continue
        if config.candidates == "trainable" and not param.requires_grad:
            user_frozen.append(name)
            continue
        if any(fnmatchcase(name, p) for p in config.exclude):
            continue
        module_path, module = owner_of[name]
        if not (config.freeze_biases or _is_weight_like(name, param, module)):
            continue
        block = block_of(name)
        key = _unit_name(config.granularity, name, module_path, block)
        groups.setdefault(key, []).append((name, param))
        blocks[key] = None if block is None else block[1]

    units = [
        Unit(
            name=key,
            params=tuple(p for _, p in members),
            param_names=tuple(n for n, _ in members),
            index=index,
            block=blocks[key],
        )
        for index, (key, members) in enumerate(groups.items())
    ]
    if config.row_chunks is not None:
        units = split_rows(model, units, config.row_chunks)
    if not units:
        frozen_hint = (
            f" {len(user_frozen)} matching parameters are frozen (requires_grad=False) and so are not "
            f"candidates; unfreeze them or set units.candidates: all."
            if user_frozen else ""
        )
        raise ConfigError(
            f"units: no freezable unit found in {model_name} with include={config.include} "
            f"exclude={config.exclude}. Widen the include patterns.{frozen_hint}"
        )
    if NORMS in config.always_train and config.granularity == "block":
        raise ConfigError(
            f"units.always_train: {NORMS!r} with granularity 'block' would train every whole block at "
            f"every step (a block holds its norms); use granularity 'tensor' or 'module'."
        )
    always_train = expand_symbols(model, config.always_train)
    _check_patterns("units.always_train", always_train, units, model_name, "unit", frozen=user_frozen)
    always = tuple(u for u in units if any(u.matches(p) for p in always_train))
    schedulable = tuple(u for u in units if u not in always)
    if not schedulable:
        raise ConfigError(
            f"units.always_train: patterns {always_train} match every unit of {model_name}; "
            f"nothing is left for the scheduler. Narrow the patterns."
        )
    return UnitSet(schedulable=schedulable, always_trained=always)


def split_rows(model: nn.Module, units: list[Unit], config: RowChunksConfig) -> list[Unit]:
    """Each unit that is one vocabulary-sized 2-D tensor replaced by units of ``config.rows`` rows
    (``name[start:stop]``), in row order; see ``RowChunksConfig`` for which and how many rows."""

    def one_matrix(unit: Unit) -> bool:
        return len(unit.params) == 1 and len(full_shape(unit.params[0])) == 2

    if config.min_params is not None:
        split = [u for u in units if one_matrix(u) and u.numel > config.min_params]
        what = f"units.row_chunks: no unit is one 2-D tensor of more than {config.min_params:,d} parameters"
    else:
        vocab = {id(p) for p in _vocabulary_weights(model)}
        split = [u for u in units if one_matrix(u) and id(u.params[0]) in vocab]
        what = f"units.row_chunks: {type(model).__name__}'s input/output embeddings are not among its units"
    if not split:
        raise ConfigError(f"{what}; nothing to split by rows. Set units.row_chunks.min_params, or remove row_chunks.")
    names = {u.name for u in split}
    others = [u.numel for u in units if u.name not in names]
    out: list[Unit] = []
    for unit in units:
        if unit.name not in names:
            out.append(unit)
            continue
        n_rows, row_numel = full_shape(unit.params[0])
        rows = config.rows or max(1, (max(others) if others else unit.numel) // row_numel)
        out += [replace(unit, name=f"{unit.param_names[0]}[{start}:{min(start + rows, n_rows)}]",
                        rows=(start, min(start + rows, n_rows)))
                for start in range(0, n_rows, rows)]
    return [replace(unit, index=index) for index, unit in enumerate(out)]


def _vocabulary_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the model's input and output embeddings (one, when tied), as transformers names them."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        try:
            module = get() if callable(get) else None
        except (AttributeError, NotImplementedError):
            module = None
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            found.append(weight)
    if not found:
        raise ConfigError(
            f"units.row_chunks: {type(model).__name__} has no input or output embeddings (get_input_embeddings); "
            f"say which tensors to split with units.row_chunks.min_params."
        )
    return found


#: The symbol ``always_train: [head]`` stands for the model's task head, whatever it is named.
HEAD = "head"
#: The symbol ``always_train: [norms]`` stands for every norm scale (LayerNorm, RMSNorm, ...).
NORMS = "norms"


def head_patterns(model: nn.Module) -> list[str]:
    """Patterns for the model's task head: its top-level modules outside the pretrained body.

    A transformers model names its body ``base_model_prefix`` (``bert``, ``transformer``,
    ``vit``, ``model``); the modules beside it with parameters are the head (``classifier``
    for BERT and ViT, ``score`` for GPT-2 and Llama, ``pre_classifier`` + ``classifier`` for
    DistilBERT). Any other module: its last top-level child with parameters. A PEFT model is
    looked through: its head is the wrapped model's (``base_model.model.classifier.*``). A
    language model's ``lm_head`` is its pretrained output embeddings, not a new head: ``head``
    then names nothing (with a warning) and the LM head is scheduled like any other unit.
    """
    inner, path = _unwrap_peft(model)
    with_params = [name for name, child in inner.named_children() if any(True for _ in child.parameters())]
    prefix = getattr(inner, "base_model_prefix", "")
    heads = [n for n in with_params if n != prefix] if prefix in with_params else with_params[-1:]
    lm_heads = [n for n in heads if _is_output_embeddings(inner, n)]
    if lm_heads and len(lm_heads) == len(heads):
        # A language model's head is its pretrained output embeddings (vocab x hidden, often the
        # largest matrix): nothing new to train, so it is scheduled like any other unit.
        warnings.warn(
            f"units.always_train: {HEAD!r}: {type(model).__name__}'s head {lm_heads} is its pretrained "
            f"output embeddings, not a new task head; it is scheduled like the other units. List "
            f"'{path}{lm_heads[0]}.*' in always_train to train it at every step.",
            stacklevel=3,
        )
        return []
    heads = [n for n in heads if n not in lm_heads]
    if not heads:
        raise ConfigError(
            f"units.always_train: {HEAD!r} names the task head, but {type(model).__name__} has no "
            f"module beside its body; list the head's parameter patterns instead (e.g. 'classifier.*')."
        )
    return [f"{path}{name}.*" for name in heads]


def _is_output_embeddings(model: nn.Module, child_name: str) -> bool:
    get_output = getattr(model, "get_output_embeddings", None)
    try:
        output = get_output() if callable(get_output) else None
    except (AttributeError, NotImplementedError):
        return False
    return output is not None and output is getattr(model, child_name, None)


def _unwrap_peft(model: nn.Module) -> tuple[nn.Module, str]:
    """The transformers model inside a PEFT model and its path prefix (``base_model.model.``)."""
    get_base = getattr(type(model), "get_base_model", None)
    if get_base is None:
        return model, ""
    inner = get_base(model)
    path = next((p for p, m in model.named_modules() if m is inner and p), None)
    return (inner, f"{path}.") if path is not None else (model, "")


def norm_patterns(model: nn.Module) -> list[str]:
    """The names of the model's norm scales: weights of modules whose class name says norm.

    Training them every step is nearly free: a norm's weight gradient needs only the normalized
    input, which backward through the (frozen or not) norm keeps anyway, and its optimizer state
    is ``hidden`` numbers per layer.
    """
    owners = _owning_modules(model)
    names = [name for name, param in model.named_parameters()
             if len(full_shape(param)) == 1 and _is_weight_like(name, param, owners[name][1])]
    if not names:
        raise ConfigError(
            f"units.always_train: {NORMS!r} names the norm scales, but {type(model).__name__} has no "
            f"module whose class name contains 'norm'; list the parameter patterns instead."
        )
    return names


def expand_symbols(model: nn.Module, patterns: list[str]) -> list[str]:
    """``patterns`` with the symbols ``head`` and ``norms`` replaced by the model's patterns."""
    expanded: list[str] = []
    for pattern in patterns:
        if pattern == HEAD:
            expanded.extend(head_patterns(model))
        elif pattern == NORMS:
            expanded.extend(norm_patterns(model))
        else:
            expanded.append(pattern)
    return expanded


def find_blocks(model: nn.Module) -> list[str]:
    """Module paths of the transformer blocks, in order (outermost repeated stacks only)."""
    stacks: list[str] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if any(path.startswith(s + ".") for s in stacks):
            continue
        kinds = {type(child) for child in module}
        if len(kinds) == 1 and all(any(True for _ in child.parameters()) for child in module):
            stacks.append(path)
    return [f"{stack}.{i}" if stack else str(i) for stack in stacks for i in range(len(model.get_submodule(stack)))]


def full_shape(param: nn.Parameter) -> tuple[int, ...]:
    """The parameter's real shape, also when DeepSpeed ZeRO-3 has partitioned it away."""
    return tuple(getattr(param, "ds_shape", param.shape))


def full_numel(param: nn.Parameter) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def _is_weight_like(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    """SlimFit's units: weights with more than one dimension, and norm scales."""
    if len(full_shape(param)) > 1:
        return True
    return name.rsplit(".", 1)[-1] == "weight" and "norm" in type(module).__name__.lower()


def _owning_modules(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    owners = {}
    for path, module in model.named_modules():
        for local_name, _ in module.named_parameters(recurse=False):
            owners[f"{path}.{local_name}" if path else local_name] = (path, module)
    return owners


def _block_index(model: nn.Module):
    blocks = find_blocks(model)

    def block_of(param_name: str) -> tuple[str, int] | None:
        for index, path in enumerate(blocks):
            if param_name.startswith(path + "."):
                return path, index
        return None

    return block_of


def _unit_name(granularity: str, param_name: str, module_path: str, block: tuple[str, int] | None) -> str:
    if granularity == "tensor":
        return param_name
    if granularity == "block" and block is not None:
        return block[0]
    return module_path or param_name


def _check_patterns(key: str, patterns: list[str], candidates, model_name: str, what: str, frozen: list[str] = ()) -> None:
    names = [c if isinstance(c, str) else c.name for c in candidates]
    for pattern in patterns:
        if isinstance(candidates[0] if candidates else None, Unit):
            hit = any(c.matches(pattern) for c in candidates)
        else:
            hit = any(fnmatchcase(n, pattern) for n in names)
        if not hit:
            raise ConfigError(f"{key}: pattern {pattern!r} matches no {what} of {model_name}{_miss_hint(pattern, candidates, names, frozen, what)}")


def _miss_hint(pattern: str, candidates, names: list[str], frozen: list[str], what: str) -> str:
    """Why a pattern missed, when it can be told: a frozen target, or a wrapped model's prefix."""
    frozen_hits = [n for n in frozen if fnmatchcase(n, pattern)]
    if frozen_hits:
        return (
            f": it matches only parameters frozen before prepare_model (e.g. {frozen_hits[0]!r}), which "
            f"are not candidates. Unfreeze them or set units.candidates: all."
        )
    wider = f"*{pattern.rstrip('*')}*"
    units = [c for c in candidates if isinstance(c, Unit)]
    if any(fnmatchcase(n, wider) for n in names) or any(u.matches(wider) for u in units):
        example = next((n for n in names if fnmatchcase(n, wider)), None) or next(
            n for u in units for n in u.param_names if fnmatchcase(n, wider)
        )
        return (
            f" (names are prefixed, e.g. {example!r}: a wrapped model such as PEFT's). "
            f"Write {wider!r} instead."
        )
    examples = ", ".join(repr(n) for n in names[:3])
    return f" ({what} names look like {examples}, ...). Fix or remove the pattern."


def unit_bytes(units: tuple[Unit, ...] | list[Unit]) -> int:
    """Bytes of the units' parameters, as stored (a row unit: its rows)."""
    return sum(
        u.numel * u.params[0].element_size() if u.rows is not None else sum(full_numel(p) * p.element_size() for p in u.params)
        for u in units
    )
