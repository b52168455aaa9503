"""The SlimFit config: typed, loaded from YAML or a dict, validated before anything trains.

Example (YAML)::

    seed: 0
    units: {granularity: tensor, always_train: ["classifier.*"]}
    scorer: {name: weight_delta}
    scheduler: {name: ils, freeze_ratio: 0.9}
    compression: slimfit

Strategy sections hold ``name`` plus the strategy's own options; those options are checked
against the strategy's signature when the strategy is built (``slimfit_accel.plugins``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .compression.policy import CompressionPolicy
from .errors import ConfigError
from .spec import StrategySpec


class RowChunksConfig(BaseModel):
    """Vocabulary-sized matrices split into row-range units (``row_units.py``), so a step budget
    smaller than the whole matrix still trains it, a range of rows at a time.

    ``min_params``: split every unit that is one 2-D tensor with more elements than this; unset:
    the model's input and output embeddings (``get_input_embeddings``/``get_output_embeddings``;
    tied ones are one tensor). ``rows``: rows per unit; unset: as many as keep a row unit no
    larger than the largest unit that is not split. Needs ``optimizer_paging: true`` (the
    optimizer state of a split tensor is stepped a row range at a time) and an element-wise
    optimizer (SGD, Adam, AdamW).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    min_params: int | None = Field(default=None, ge=0)
    rows: int | None = Field(default=None, gt=0)


class UnitsConfig(BaseModel):
    """Which parameters are freezable units and how they are grouped.

    ``granularity``: ``tensor`` (SlimFit: each weight with more than one dimension, plus norm
    scales), ``module`` (a layer's weights together) or ``block`` (a whole transformer layer).
    ``include``/``exclude``: glob patterns over parameter names choosing the candidates (others
    are left as the user set them). ``always_train``: patterns over unit or parameter names for
    units trained at every step (e.g. a new classifier head; ``head`` names the model's task head,
    nothing for a language model whose head is its output embeddings; ``norms`` names every norm
    scale; a wrapped model such as PEFT's names it ``base_model.model.classifier...``, so write
    ``"*classifier*"``). ``freeze_biases``: make biases and norm shifts freezable too (SlimFit
    keeps them always trainable: they are cheap). ``candidates``: ``trainable`` (default) takes
    only parameters with ``requires_grad`` when ``prepare_model`` runs, so whatever the user froze
    (a PEFT base model, frozen embeddings) stays frozen; ``all`` makes every matching unit
    trainable first and schedules the whole model. ``row_chunks``: ``true`` or ``{min_params,
    rows}`` splits vocabulary-sized matrices into row-range units (see ``RowChunksConfig``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    granularity: Literal["tensor", "module", "block"] = "tensor"
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    always_train: list[str] = Field(default_factory=list)
    freeze_biases: bool = False
    candidates: Literal["trainable", "all"] = "trainable"
    row_chunks: RowChunksConfig | None = None

    @field_validator("row_chunks", mode="before")
    @classmethod
    def _row_chunks_switch(cls, value: Any) -> Any:
        if value is True:
            return {}
        return None if value is False else value


#: MiB of parameters the streamed optimizer step updates at once (``paging.DEFAULT_CHUNK_BYTES``).
DEFAULT_PAGING_CHUNK_MIB = 32.0


class CheckpointingConfig(BaseModel):
    """Which transformer blocks are recomputed in backward instead of keeping their activations.

    ``blocks``: ``all``, the first N blocks (nearest the input: their activations live longest,
    and backward recomputes them last, when the others' are freed), or a list of block indices.
    ``input``: what a checkpointed block keeps of its input: ``compressed`` (by the policy, role
    ``block_input``: int8 by default; exact with ``compression: none``) or ``exact`` (as it is:
    the recomputation then computes the forward's own values; the decoder default ``sft.yaml``
    checkpoints its first blocks so). What a recomputation saves is kept uncompressed while its
    block's backward runs (it lives that long only), so from an exact input a checkpointed block's gradients are at
    least as exact as without checkpointing.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    blocks: Literal["all"] | int | list[int] = "all"
    input: Literal["compressed", "exact"] = "compressed"

    @field_validator("blocks")
    @classmethod
    def _count_is_positive(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:  # -1 meant as "the last block" would select none
            raise ValueError(f"{value} is a count of blocks from the input (at least 1); for indices write a list, e.g. [{value}]")
        return value


class ChunkedLossConfig(BaseModel):
    """A causal LM's loss computed a chunk of tokens at a time (``chunked_loss.py``): the
    batch x length x vocab logits never exist whole in training; loss and gradients equal the
    standard path's. ``chunk_size``: tokens per chunk (its fp32 logits, chunk x vocab, are the
    working memory). ``backend``: ``torch`` (chunked, any device), ``liger`` (liger-kernel's fused
    linear cross-entropy; needs CUDA and the package), ``auto`` (liger where it applies, else torch).
    ``fallback``: for a model the chunked loss does not cover (``chunked_loss.unsupported``: no
    plain linear head, a custom loss, logit soft-capping or scaling in its config), ``error``
    refuses it when the model is prepared; ``standard`` leaves that model on the standard loss
    with one warning saying why. ``chunked_loss: auto`` is ``{fallback: standard}``: a config
    meant for any causal LM.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    chunk_size: int = Field(default=1024, gt=0)  # chunked_loss.DEFAULT_CHUNK_SIZE (not imported: it reads transformers)
    backend: Literal["auto", "torch", "liger"] = "auto"
    fallback: Literal["error", "standard"] = "error"


#: Optimizer steps between two steps the default memory meter measures (see ``MemoryMeterConfig``).
DEFAULT_METER_EVERY = 10


class MemoryMeterConfig(BaseModel):
    """How often SlimFit's exact memory meter (``memory.py``) measures a step: every ``every``-th
    optimizer step (all its micro-batches), starting with the first. Steps in between run none of
    the meter's code: no hooks, no CUDA synchronisation.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    every: int = Field(default=1, ge=1)


class SlimFitConfig(BaseModel):
    """The whole SlimFit config.

    ``compression``: which saved activations are compressed and how: ``slimfit`` (SlimFit's
    table with scaled int8/int4 formats, the default), ``reference`` (the reference's
    fixed-point formats), ``none`` (off), or a policy mapping (``rules``, ``default``).

    ``optimizer_paging``: keep the optimizer state in host memory (pinned on CUDA) and stream
    the trained units' state through the optimizer step, chunk by chunk, releasing each chunk's
    gradients as it goes; results are bit-identical. For torch optimizers on one device or
    DDP; a no-op (with a warning) under DeepSpeed ZeRO, whose ``offload_optimizer`` keeps the
    state on host instead. ``paging_chunk_mib`` (default 32): how many MiB of parameters (of
    their fp32 masters under ``master_weights: host``) are stepped at once; a larger tensor is
    stepped a slice of rows of that size at a time. The device holds one chunk's state (masters,
    two moments, fp32 gradients: 4x that; twice on CUDA with the prefetch) while it is stepped:
    with ``optimizer_step: in_backward`` that is during backward, so a smaller chunk lowers the
    peak (at more, smaller copies).

    ``master_weights``: ``host`` keeps each weight once on the device, in bf16, and the fp32
    master weights of what the optimizer trains in host memory with the optimizer state,
    streamed through the step with it (``master_weights.py``); bit-identical to mixed-precision
    AdamW with fp32 masters. Needs ``optimizer_paging: true``. Under DeepSpeed, whose bf16 keeps
    fp32 masters in its own optimizer, a no-op with a warning; refused under FSDP2.

    ``frozen_weights``: ``full`` (default) keeps every weight on the device as the model holds it;
    ``int8`` keeps each schedulable 2-D weight (``nn.Linear``, ``nn.Embedding``; a tied embedding
    once) on the device as int8 codes with one fp32 scale per row, its exact value (the fp32 master
    of ``master_weights: host``, else a copy of the weight) in host memory. A unit the step trains
    is materialised in full precision from its master before forward, trained and stepped as
    usual, then requantised from the updated master and freed; frozen units compute forward and
    input gradients from a weight dequantised on the fly (``frozen_int8.py``). So a step reads
    full-precision weights only for the units it trains; the frozen ones compute with their int8
    rounding (an accuracy cost to measure). One device or DDP; refused under DeepSpeed and FSDP.

    ``optimizer_step``: ``after_backward`` (default) steps the optimizer when the loop calls
    ``optimizer.step()``; ``in_backward`` updates each trained unit as soon as backward has
    completed its gradient and releases that gradient, so a step holds a few units' gradients
    instead of all of them (``step_in_backward.py``); bit-identical for AdamW and every
    ``torch.optim`` optimizer but LBFGS. One process or DDP (each unit stepped once DDP has
    averaged its buckets); no DeepSpeed or FSDP, gradient accumulation (nor DDP's ``no_sync``),
    clipping, fp16 loss scaling or closures: each is refused with the reason. Composes with
    ``optimizer_paging`` and ``master_weights: host``.

    ``input_embedding``: ``device`` (default) keeps the input embedding where the model is;
    ``host`` keeps an input embedding the run never trains (frozen by the user, or a unit the
    scheduler can never pick) in host memory, looks its rows up there and copies only those to the
    device (exact; ``host_embedding.py``); refused, with the reason, for one the run trains, one
    tied to the LM head, several processes, DeepSpeed or FSDP. ``auto``: ``host`` where it can
    be, else on the device with one warning saying why.

    ``checkpointing``: frozen-aware activation checkpointing of transformer blocks (see
    ``CheckpointingConfig``); off when absent.

    ``lr_scale``: multiplies every param group's learning rate inside each optimizer step
    (the LR scheduler and the logged rate are untouched). A unit trains in only a fraction of
    the steps, so it takes larger steps when it does; the default config uses 3 (measured in
    ``benchmarks/RESULTS.md``). 1 leaves the optimizer as the user built it. It scales the
    always-trained parameters too (a new task head, and on decoders the norms ILS picks every
    step): the user's param groups are scaled as they are, never split, and every accuracy
    figure of the default config was measured that way. Training more units a step at the same
    scale overshoots (SmolLM2 SFT, lr 3e-4: freeze ratio 0.8 / 0.7 / 0.6 gave 3.300 / 3.438 /
    3.457), so lower it with the freeze ratio.

    ``chunked_loss``: ``true``, ``auto`` (the same where the model allows it, else the standard
    loss with a warning) or ``{chunk_size: N, backend: ..., fallback: ...}`` computes a causal LM's
    training loss without materialising its logits (see ``ChunkedLossConfig``); off when absent.

    ``memory_meter``: when ``slimfit.report()`` measures memory by category. ``{every: N}``
    measures every N-th optimizer step (the default: every 10th, so the report has figures at a
    tenth of the meter's cost), ``always`` every step (exact peaks over the run: benchmarks and
    the recipe ask for it), ``off`` never (no meter hooks at all; the report says memory was not
    measured). ``true``/``false`` and a bare number N are accepted too.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    seed: int = 0
    units: UnitsConfig = Field(default_factory=UnitsConfig)
    scorer: StrategySpec = Field(default_factory=lambda: StrategySpec(name="weight_delta"))
    scheduler: StrategySpec = Field(
        default_factory=lambda: StrategySpec(name="ils", freeze_ratio=0.9)
    )
    compression: Literal["slimfit", "reference", "none"] | CompressionPolicy = "slimfit"
    optimizer_paging: bool = False
    paging_chunk_mib: float = Field(default=DEFAULT_PAGING_CHUNK_MIB, gt=0.0)
    master_weights: Literal["host"] | None = None
    frozen_weights: Literal["full", "int8"] = "full"
    optimizer_step: Literal["after_backward", "in_backward"] = "after_backward"
    input_embedding: Literal["device", "host", "auto"] = "device"
    checkpointing: CheckpointingConfig | None = None
    lr_scale: float = Field(default=1.0, gt=0.0, le=100.0)
    chunked_loss: ChunkedLossConfig | None = None
    memory_meter: Literal["always", "off"] | MemoryMeterConfig = Field(
        default_factory=lambda: MemoryMeterConfig(every=DEFAULT_METER_EVERY)
    )

    @field_validator("memory_meter", mode="before")
    @classmethod
    def _memory_meter_shorthand(cls, value: Any) -> Any:
        if value is True:
            return "always"
        if value is False:
            return "off"
        return {"every": value} if isinstance(value, int) else value

    @property
    def meter_every(self) -> int:
        """Optimizer steps between measured ones: 1 always, N sampled, 0 off."""
        setting = self.memory_meter
        return {"always": 1, "off": 0}[setting] if isinstance(setting, str) else setting.every

    @field_validator("chunked_loss", mode="before")
    @classmethod
    def _chunked_loss_switch(cls, value: Any) -> Any:
        if value is True:
            return {}
        if value == "auto":
            return {"fallback": "standard"}
        if isinstance(value, str):
            raise ValueError(f"give true, false, auto or a mapping {{chunk_size, backend, fallback}}, not {value!r}")
        return None if value is False else value

    @model_validator(mode="after")
    def _master_weights_need_paging(self) -> "SlimFitConfig":
        if self.master_weights is not None and not self.optimizer_paging:
            raise ValueError(
                "master_weights: host streams the masters with the optimizer state: set optimizer_paging: true"
            )
        if self.paging_chunk_mib != DEFAULT_PAGING_CHUNK_MIB and not self.optimizer_paging:  # the default round-trips
            raise ValueError("paging_chunk_mib sizes the streamed optimizer step: set optimizer_paging: true, or remove it")
        if self.units.row_chunks is not None and not self.optimizer_paging:
            raise ValueError(
                "units.row_chunks steps a split tensor's optimizer state a row range at a time, which the "
                "streamed optimizer step does: set optimizer_paging: true"
            )
        return self


def load_config(source: str | Path | Mapping[str, Any] | SlimFitConfig) -> SlimFitConfig:
    """Load and validate a config from a YAML file path, a dict, or a ready ``SlimFitConfig``.

    Raises ``ConfigError`` naming the file, the key and what to do.
    """
    if isinstance(source, SlimFitConfig):
        return source
    if isinstance(source, Mapping):
        return _validate(dict(source), where="config")
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file. Pass the path of a SlimFit YAML file.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}{at}: YAML syntax error: {problem}. Fix the YAML and retry.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a SlimFit config is a mapping (keys such as scheduler:, scorer:), "
            f"got a {type(data).__name__}."
        )
    return _validate(data, where=str(path))


def _validate(data: dict[str, Any], where: str) -> SlimFitConfig:
    try:
        return SlimFitConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, where)) from None


def _describe(err: ValidationError, where: str) -> str:
    lines = [f"{where}: invalid SlimFit config:"]
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see the config reference in README.md)"
        got = problem.get("input")
        shown = "" if problem["type"] in ("missing", "extra_forbidden") else f" (got {got!r})"
        lines.append(f"  {key}: {message}{shown}")
    return "\n".join(lines)
