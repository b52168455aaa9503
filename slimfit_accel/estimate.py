"""Will it fit my GPU? Device memory of fine-tuning arms, from a model's config.json alone.

How: each arm's real training step runs on fake tensors (``torch._subclasses.FakeTensorMode``:
shapes, dtypes and autograd graphs, no data, no weights) through the same code a real run uses:
the model built from its config by transformers, PEFT for LoRA, ``SlimFit`` (units, scheduler,
compression engine, block checkpointing, chunked loss, optimizer paging, master weights) and the
``MemoryMeter``. The meter's figures are sums of ``numel * element_size`` over the tensors that
exist, so on fake tensors they are the figures a real run measures, exactly (tested against real
runs in ``tests/test_estimate.py``; ``benchmarks/memory.py`` measures the large geometries).

Fake tensors have no data, so a few things are supplied (``shape_only``):

- each fake storage gets a distinct made-up address, so identity checks (tied weights, views,
  "is this saved tensor a parameter") answer as on a device;
- a data-dependent branch reads "true", a scalar reads 1 (``.item()``) and every element is
  non-zero (``.nonzero()``): transformers' checks for packed sequences and padding, and the
  chunked loss's valid tokens, take the path of an unpadded batch, the one estimated;
- the compression swaps (RMSNorm, gated MLP) decide on a random copy's real output, as always,
  once per kind of module;
- the ``bitmask`` compressor stores as a mask what dropout drew (the output of ``bernoulli_``,
  scaled in place), and sends anything else to its fallback (a real run decides from values);
- transformers is told fake tensors are not tracing (else it builds masks a real run skips);
- SlimFit's scores: a unit that trained scores 0 (its real score, the relative weight change,
  is tiny next to the huge score of units not trained yet), so the scheduler draws the same
  units in the same seeded order as a real run's first steps.

Steady state (as ``benchmarks/memory.py`` measures it): arms built on SlimFit start with AdamW
state for every parameter (resident, or paged to host); under optimizer paging the step is
also bounded by the largest the config allows (``worst_case_total``), and with
``frozen_weights: int8`` the weights by the largest set of full-precision copies a step can
train (``worst_case_weights``). Under ILS's parameter budget one more step is measured, which
trains the units whose gradients backward makes first (``first_gradients_draw``: the LM head,
then the last blocks): a draw the seeded steps may miss, whose gradients are held while nearly
every activation still is (Llama-3-8B, 2 x 2048, the default config: 22.2 GiB instead of 21.4).

Not measured, by formula: the working set (temporaries the meter does not count: the logits of
a causal LM's forward and their fp32 upcast, or one chunk's with chunked loss; also one layer's
dequantised weight under ``frozen_weights: int8``).

Example::

    slimfit-accel estimate --model slimfit_accel/configs/models/llama-3-8b --seq-len 2048 --batch 2 --precision bf16
    slimfit-accel estimate --model ./my-model --budget 24GiB --write-config fit.yaml
"""

from __future__ import annotations

import copy
import math
import os
import re
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import yaml

from .errors import ConfigError

GiB = 2**30
#: GPUs of these sizes (GB as sold: the card's memory in GiB); a fit leaves CUDA_RESERVE free.
GPU_SIZES_GB = (12, 16, 24, 48)
#: What the CUDA context and allocator take before any tensor (a typical figure, not measured).
CUDA_RESERVE = GiB // 2
ARMS = ("full", "full_pure_bf16", "full_checkpointing", "lora", "slimfit_default", "slimfit_best", "slimfit_8bit_frozen")
FORMULA_ARMS: tuple[str, ...] = ()  # every arm runs (slimfit_8bit_frozen too, since frozen_weights: int8 exists)


# ------------------------------------------------------------------------- fake execution
@contextmanager
def shape_only() -> Iterator[None]:
    """Run real training code on fake tensors (see the module docstring for what is supplied)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
    from transformers.utils import import_utils

    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    from .compression import gated_mlp, rmsnorm
    from .strategies.compression.bitmask import Bitmask

    originals = {
        (torch.Tensor, "data_ptr"): torch.Tensor.data_ptr,
        (torch.UntypedStorage, "data_ptr"): torch.UntypedStorage.data_ptr,
        (torch.Tensor, "item"): torch.Tensor.item,
        (torch.Tensor, "__bool__"): torch.Tensor.__bool__,
        (torch.Tensor, "tolist"): torch.Tensor.tolist,
        (import_utils, "is_fake_tensor"): import_utils.is_fake_tensor,
        (torch.nn.Module, "to"): torch.nn.Module.to,
        (Bitmask, "pack"): Bitmask.pack,
        (torch.Tensor, "nonzero"): torch.Tensor.nonzero,
        (rmsnorm, "is_rmsnorm"): rmsnorm.is_rmsnorm,
        (gated_mlp, "_assignment"): gated_mlp._assignment,  # noqa: SLF001
    }

    def storage_ptr(storage):
        ptr = originals[(torch.UntypedStorage, "data_ptr")](storage)
        return ptr if ptr else storage._cdata << 40  # distinct per storage, far from real addresses

    def data_ptr(tensor):
        if isinstance(tensor, FakeTensor):
            return storage_ptr(tensor.untyped_storage()) + tensor.storage_offset() * tensor.element_size()
        return originals[(torch.Tensor, "data_ptr")](tensor)

    def item(tensor):
        if isinstance(tensor, FakeTensor):
            return True if tensor.dtype == torch.bool else (1.0 if tensor.is_floating_point() else 1)
        return originals[(torch.Tensor, "item")](tensor)

    def as_bool(tensor):
        return True if isinstance(tensor, FakeTensor) else originals[(torch.Tensor, "__bool__")](tensor)

    def tolist(tensor):
        if isinstance(tensor, FakeTensor):
            return _zeros_list(tuple(tensor.shape))
        return originals[(torch.Tensor, "tolist")](tensor)

    def module_to(module, *args, **kwargs):
        # Module.to swaps fake parameters (swap_tensors), which fails while anything else refers
        # to them; everything here is on one (fake) device: a dtype change sets .data instead.
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and torch.device(device).type != "cpu":
            return originals[(torch.nn.Module, "to")](module, *args, **kwargs)
        if dtype is not None:
            for tensor in list(module.parameters()) + list(module.buffers()):
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)
        return module

    def on_real_numbers(probe):
        # The compression swaps compare a random copy's output with the formula: on real numbers.
        # Modules alike (class, parameter shapes and dtypes, children's classes) answer alike, so
        # each kind is probed once (an 8B model's 32 MLPs would each draw a random copy).
        answers: dict[Any, Any] = {}

        def run(module):
            key = (type(module), tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters()),
                   tuple(type(m) for m in module.modules()), getattr(module, "eps", None), getattr(module, "variance_epsilon", None))
            if key not in answers:
                with unset_fake_temporarily():
                    answers[key] = probe(module)
            return answers[key]

        return run

    def nonzero(tensor, *args, **kwargs):
        # every element counts as non-zero (as in the unpadded batch estimated: every token valid)
        if not isinstance(tensor, FakeTensor) or args or kwargs:
            return originals[(torch.Tensor, "nonzero")](tensor, *args, **kwargs)
        index = torch.arange(tensor.numel())
        columns, stride = [], tensor.numel()
        for size in tensor.shape:
            stride //= size
            columns.append((index // stride) % size)
        return torch.stack(columns, 1) if columns else index.reshape(-1, 0)

    masks: dict[int, Any] = {}  # storage id -> weak reference: the tensors dropout drew (bernoulli_)

    class DropoutMasks(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.bernoulli_, torch.ops.aten.bernoulli) and isinstance(out, torch.Tensor):
                storage = out.untyped_storage()
                masks[storage._cdata] = StorageWeakRef(storage)
            return out

    def is_mask(tensor) -> bool:
        ref = masks.get(tensor.untyped_storage()._cdata)
        return ref is not None and not ref.expired()

    def bitmask_pack(compressor, tensor, ctx=None):
        # Whether a tensor is a 0/c mask is in its values; on fake tensors: what dropout drew
        # (bernoulli_, then scaled in place) is, anything else goes to the fallback.
        if not isinstance(tensor, FakeTensor) or compressor.sign:
            return originals[(Bitmask, "pack")](compressor, tensor, ctx)
        if is_mask(tensor):
            flat = tensor.detach().reshape(-1)
            return compressor._pack_bits(flat != 0, flat[0], tensor)  # noqa: SLF001
        return compressor._fallback.pack(tensor, ctx) if compressor._fallback is not None else tensor  # noqa: SLF001

    replacements = {
        (torch.Tensor, "data_ptr"): data_ptr,
        (torch.UntypedStorage, "data_ptr"): storage_ptr,
        (torch.Tensor, "item"): item,
        (torch.Tensor, "__bool__"): as_bool,
        (torch.Tensor, "tolist"): tolist,
        (import_utils, "is_fake_tensor"): lambda tensor: False,
        (torch.nn.Module, "to"): module_to,
        (Bitmask, "pack"): bitmask_pack,
        (torch.Tensor, "nonzero"): nonzero,
        (rmsnorm, "is_rmsnorm"): on_real_numbers(rmsnorm.is_rmsnorm),
        (gated_mlp, "_assignment"): on_real_numbers(gated_mlp._assignment),  # noqa: SLF001
    }
    try:
        for (owner, name), value in replacements.items():
            setattr(owner, name, value)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
            warnings.filterwarnings("ignore", category=UserWarning, module="slimfit_accel")
            with FakeTensorMode(allow_non_fake_inputs=True), DropoutMasks():
                yield
    finally:
        for (owner, name), value in originals.items():
            setattr(owner, name, value)


def _zeros_list(shape: tuple[int, ...]) -> Any:
    if not shape:
        return 0.0
    return [_zeros_list(shape[1:]) for _ in range(shape[0])]


# ------------------------------------------------------------------------- inputs
@dataclass
class Setup:
    """What is estimated: the model (a folder with config.json), its task, the batch."""

    model_dir: Path
    seq_len: int
    batch: int
    precision: str = "bf16"  # bf16 (mixed; pure-bf16 arm too) or fp32
    task: str | None = None  # causal-lm or classification; None: from the config
    slimfit_config: Mapping[str, Any] | None = None  # base of the SlimFit arms (default: default_config_path)
    freeze_ratio: float = 0.9  # slimfit_best's
    seed: int = 0
    steps: int = 2  # measured steps after one warm-up, as benchmarks/memory.py
    device: str = "cuda"  # what paging streams on: CUDA prefetches a second chunk (cpu: as measured here)
    fake: bool = True  # False: the same steps on real tensors (random weights), to check the estimate
    config: Any = None  # the transformers config, read by load()

    def load(self) -> "Setup":
        from transformers import AutoConfig

        path = Path(self.model_dir)
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {path}: no config.json there; pass a folder with a transformers config.json (no weights needed)")
        try:
            self.config = AutoConfig.from_pretrained(str(path))
        except Exception as err:  # transformers raises several kinds for a bad file
            raise ConfigError(f"--model {path}: cannot read its config.json ({str(err).splitlines()[0]})") from None
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"--precision {self.precision}: choose bf16 or fp32")
        if self.seq_len <= 0 or self.batch <= 0:
            raise ConfigError(f"--seq-len {self.seq_len} --batch {self.batch}: both must be positive")
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit and self.seq_len > limit:
            raise ConfigError(f"--seq-len {self.seq_len} is longer than the model's max_position_embeddings ({limit})")
        if self.task is None:
            architectures = getattr(self.config, "architectures", None) or []
            causal = any(a.endswith("ForCausalLM") for a in architectures) or getattr(self.config, "is_decoder", False)
            self.task = "causal-lm" if causal else "classification"
        if self.task not in ("causal-lm", "classification"):
            raise ConfigError(f"--task {self.task}: choose causal-lm or classification")
        return self

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    def base_slimfit(self) -> dict[str, Any]:
        if self.slimfit_config is not None:
            return copy.deepcopy(dict(self.slimfit_config))
        return yaml.safe_load(self.default_config_path.read_text())

    @property
    def default_config_path(self) -> Path:
        """The packaged default the recipe uses for this task: sft.yaml for a causal LM, else demo.yaml."""
        from .configs import packaged_config

        return Path(packaged_config("sft" if self.task == "causal-lm" else "demo"))

    def build_model(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        torch.manual_seed(self.seed)
        config = copy.deepcopy(self.config)
        config.use_cache = False
        if self.task == "causal-lm":
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            config.num_labels = getattr(config, "num_labels", 2) or 2
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        return model.train()

    def make_batch(self) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        vocab = self.config.vocab_size
        ids = torch.randint(0, vocab, (self.batch, self.seq_len), generator=generator)
        if self.task == "causal-lm":
            return {"input_ids": ids, "labels": ids}
        return {"input_ids": ids, "labels": torch.randint(0, 2, (self.batch,), generator=generator)}


# ------------------------------------------------------------------------- arms
@dataclass
class Arm:
    """A built arm: what one training step needs, and what the estimate reports of it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    meter: Any
    step: Callable[[], Any] | None = None  # a context per step (SlimFit's)
    cleanup: Callable[[], None] | None = None
    metered: bool = False  # the step context runs the meter
    slimfit: Any = None
    autocast: bool = False
    chunked: int | None = None  # chunk size when the loss is chunked
    slimfit_config: dict[str, Any] | None = None
    note: str = ""


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-5)


def prime_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW state for every parameter, as once every unit has trained (zero gradients, one step)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _meter(model, optimizer):
    from .memory import MemoryMeter

    return MemoryMeter(model, optimizer)


def arm_full(setup: Setup) -> Arm:
    model = setup.build_model()
    optimizer = _adamw(model.parameters())
    return Arm(model, optimizer, _meter(model, optimizer), autocast=setup.bf16,
               note="fp32 weights and AdamW, bf16 autocast" if setup.bf16 else "fp32")


def arm_full_pure_bf16(setup: Setup) -> Arm:
    model = setup.build_model(torch.bfloat16)
    optimizer = _adamw(model.parameters())
    return Arm(model, optimizer, _meter(model, optimizer), note="bf16 weights and bf16 AdamW state")


def arm_full_checkpointing(setup: Setup) -> Arm:
    arm = arm_full(setup)
    # reentrant: recomputed blocks' saved tensors go through the meter's hooks (benchmarks/memory.py)
    arm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    arm.note += ", every block recomputed (transformers' gradient checkpointing)"
    return arm


def arm_lora(setup: Setup) -> Arm:
    from peft import LoraConfig, get_peft_model

    base = setup.build_model(torch.bfloat16 if setup.bf16 else torch.float32)
    targets = _attention_projections(base)
    task = "CAUSAL_LM" if setup.task == "causal-lm" else "SEQ_CLS"
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type=task))
    optimizer = _adamw(model.parameters())
    note = f"r=8 on {'/'.join(targets)}" + (", bf16 base, fp32 adapters, bf16 autocast" if setup.bf16 else "")
    return Arm(model, optimizer, _meter(model, optimizer), autocast=setup.bf16, note=note)


def _attention_projections(model: torch.nn.Module) -> list[str]:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for choice in (["q_proj", "k_proj", "v_proj"], ["query", "key", "value"], ["c_attn"], ["qkv_proj"]):
        if set(choice) <= names:
            return choice
    raise ConfigError("LoRA: no attention projections (q_proj/k_proj/v_proj or query/key/value) in this model")


def slimfit_arm(setup: Setup, config: dict[str, Any], note: str = "") -> Arm:
    """A SlimFit arm from ``config``, as benchmarks/memory.py builds it (primed AdamW state)."""
    from .slimfit import SlimFit

    slimfit = SlimFit.from_config(config, memory_meter="always")  # each step measured
    model = slimfit.prepare_model(setup.build_model())
    optimizer = _adamw(model.parameters())
    if slimfit.master_weights is not None:
        prime_with_masters(optimizer, slimfit.master_weights)
    else:
        prime_optimizer_state(optimizer)
    slimfit.attach(None, model, optimizer)
    if setup.fake:
        _scores_without_data(slimfit.controller)
    from .chunked_loss import chunked_loss_enabled

    chunked = slimfit.config.chunked_loss.chunk_size if chunked_loss_enabled(model) else None  # auto may leave it off
    if slimfit.host_embedding is not None:  # input_embedding: auto may leave it on the device
        note += ", input embedding on host (never trained)"
    return Arm(model, optimizer, slimfit.memory, step=slimfit.step, cleanup=slimfit.detach, metered=True,
               slimfit=slimfit, autocast=setup.bf16, chunked=chunked, slimfit_config=config, note=note)


def prime_with_masters(optimizer: torch.optim.Optimizer, masters: Any) -> None:
    """Primed state against the fp32 masters (as ``master_weights: host`` creates it): fp32."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            master = masters.of(param)
            reference = master.host if master is not None else param
            optimizer.state[param] = {
                "step": torch.tensor(1.0),
                "exp_avg": torch.zeros_like(reference, device=param.device),
                "exp_avg_sq": torch.zeros_like(reference, device=param.device),
            }


def _scores_without_data(controller: Any) -> None:
    """Real scores for the scheduler, and a unit that trained scores 0 (see the module docstring)."""
    import dataclasses

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from .controller import UNTRAINED_SCORE
    from .rng import derived_generator

    with unset_fake_temporarily():  # built under the fake mode: the same draw, on real numbers
        count = len(controller.scores)
        controller.scores = UNTRAINED_SCORE * (1 + torch.rand(count, generator=derived_generator(controller.seed), dtype=torch.float64))
    controller._checked = None  # noqa: SLF001 (the decision bind() validated was drawn on fake scores)

    def update(views, carried):
        with unset_fake_temporarily():
            for view in views:
                controller.scores[controller._position[view.name]] = 0.0  # noqa: SLF001 (the controller's index)

    controller._update_scores = update  # noqa: SLF001
    # no weight snapshots for a score never computed (the meter does not count them)
    controller.scorer = dataclasses.replace(controller.scorer, strategy=_NoSnapshot())


class _NoSnapshot:
    def before_step(self, views):
        return None

    def after_step(self, views, before):  # pragma: no cover - replaced with the update above
        return torch.zeros(len(views))


def slimfit_default_config(setup: Setup) -> dict[str, Any]:
    """The config as given; in bf16 as the recipe runs it (``finetune.with_bf16_masters``): a
    config that pages the optimizer and leaves ``master_weights`` unset gets ``host``."""
    config = setup.base_slimfit()
    if setup.bf16 and config.get("optimizer_paging") and "master_weights" not in config:
        config["master_weights"] = "host"
    return config


#: The chunked loss of the most memory-saving config: 256 tokens a chunk keeps its fp32 logits
#: working set at a quarter of the default's (Llama-3-8B, 2 x 2048: 0.24 vs 0.98 GiB).
BEST_LOSS_CHUNK = {"chunk_size": 256}

#: The optimizer step of the most memory-saving config: each trained unit stepped as soon as its
#: gradient is complete, so backward holds two units' gradients instead of the step's, and 4 MiB
#: of fp32 masters paged in at a time (16 MiB of device state while a unit is stepped, against
#: 128 MiB at the default 32). Exact (bit-identical to the step after backward).
BEST_STEP = {"optimizer_step": "in_backward", "paging_chunk_mib": 4}

#: Where the most memory-saving config keeps what a step never trains: an input embedding the
#: run never trains (ILS's budget below its size, or frozen by the user) in host memory, only its
#: looked-up rows on the device (exact; ``auto``: on the device where it cannot be, e.g. tied).
BEST_PLACEMENT = {"input_embedding": "auto"}


def slimfit_best_config(setup: Setup) -> dict[str, Any]:
    """The default config with ``freeze_ratio``, every block checkpointed, optimizer paging with
    the step in backward (``BEST_STEP``), a never-trained input embedding on host
    (``BEST_PLACEMENT``), and for a causal LM the chunked loss; in bf16 the fp32 masters on host
    (bf16 weights on device)."""
    config = setup.base_slimfit()
    scheduler = dict(config.get("scheduler") or {"name": "ils"})
    scheduler["freeze_ratio"] = setup.freeze_ratio
    config.update(scheduler=scheduler, checkpointing={"blocks": "all"}, optimizer_paging=True, **BEST_STEP, **BEST_PLACEMENT)
    config.setdefault("compression", "slimfit")
    if setup.task == "causal-lm":
        config["chunked_loss"] = dict(BEST_LOSS_CHUNK)
    if setup.bf16:
        config["master_weights"] = "host"
    return config


def arm_slimfit_default(setup: Setup) -> Arm:
    config = slimfit_default_config(setup)
    note = "the given SlimFit config" if setup.slimfit_config else f"the packaged default config ({setup.default_config_path.name})"
    if setup.bf16 and config.get("master_weights") == "host":
        note += ", bf16 weights, fp32 masters on host (as the recipe's --mixed-precision bf16)"
    return slimfit_arm(setup, config, note=note)


def arm_slimfit_best(setup: Setup) -> Arm:
    parts = [f"freeze_ratio {setup.freeze_ratio}", "all blocks checkpointed", "optimizer paging, stepped in backward"]
    parts += ["chunked loss"] if setup.task == "causal-lm" else []
    parts += ["bf16 weights, fp32 masters on host"] if setup.bf16 else []
    return slimfit_arm(setup, slimfit_best_config(setup), note=", ".join(parts))


def arm_slimfit_8bit_frozen(setup: Setup) -> Arm:
    """``slimfit_best`` with ``frozen_weights: int8``: schedulable matrices as int8 codes + fp32 row
    scales on the device, a step's trained ones also in full precision while they train."""
    config = slimfit_best_config(setup)
    config["frozen_weights"] = "int8"
    return slimfit_arm(setup, config, note="as slimfit_best, frozen weights int8 + fp32 row scales (frozen_weights: int8)")


ARM_BUILDERS: dict[str, Callable[[Setup], Arm]] = {
    "full": arm_full, "full_pure_bf16": arm_full_pure_bf16, "full_checkpointing": arm_full_checkpointing,
    "lora": arm_lora, "slimfit_default": arm_slimfit_default, "slimfit_best": arm_slimfit_best,
    "slimfit_8bit_frozen": arm_slimfit_8bit_frozen,
}


# ------------------------------------------------------------------------- running
@dataclass
class ArmEstimate:
    """Device bytes of one arm at its steady state, by category (see ``CATEGORY_LABELS``)."""

    name: str
    method: str  # "fake-tensor run"
    note: str
    weights: int
    gradients: int
    optimizer: int  # on the device (under paging: the most the step holds)
    optimizer_host: int  # paged state and fp32 masters in host memory
    weights_host: int  # weights kept in host memory (input_embedding: host)
    activations_stored: int
    activations_raw: int
    logits_and_loss: int  # of the stored activations, what the logits and the loss keep (by shape)
    meter_total: int  # the meter's steady total: the peak of weights+gradients+optimizer+activations
    working_set: int  # temporaries the meter does not count (formula)
    device_total: int  # meter_total + working_set
    trainable: int  # parameters the optimizer holds
    fits: dict[str, bool] = field(default_factory=dict)
    slimfit_config: dict[str, Any] | None = None


CATEGORY_LABELS = {
    "weights": "weights", "gradients": "gradients (peak live)", "optimizer": "optimizer, device",
    "optimizer_host": "optimizer+masters, host", "weights_host": "weights, host", "activations_raw": "saved act. raw",
    "activations_stored": "saved act. stored", "logits_and_loss": "of which logits+loss",
    "meter_total": "meter total", "working_set": "working set*", "device_total": "device total",
}


def run_arm(setup: Setup, name: str, builder: Callable[[Setup], Arm] | None = None) -> ArmEstimate:
    """Build the arm (``builder``, default the arm of that name) and run its warm-up and
    measured steps on fake tensors (real ones with ``setup.fake`` false)."""
    with shape_only() if setup.fake else ExitStack():
        arm = (builder or ARM_BUILDERS[name])(setup)
        batch = setup.make_batch()
        measured = []
        # Without SlimFit every step after the first is the same: one is measured. SlimFit arms
        # measure as many as benchmarks/memory.py (the units drawn change from step to step),
        # then one step that trains the units whose gradients come first (``first_gradients_draw``).
        drawn = setup.steps if arm.slimfit is not None else 1
        first = first_gradients_draw(arm.slimfit) if arm.slimfit is not None else None
        for index in range(1 + drawn + (first is not None)):
            if index == 1 + drawn:
                arm.slimfit.controller.decide_next(first)
            with ExitStack() as stack:
                if not arm.metered:
                    stack.enter_context(arm.meter.step())
                if arm.step is not None:
                    stack.enter_context(arm.step())
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=arm.autocast):
                    loss = arm.model(**batch).loss
                loss.backward()
                arm.optimizer.step()
                arm.optimizer.zero_grad(set_to_none=True)
            if index >= 1:
                measured.append(arm.meter.last)
        peak = {k: max(getattr(m, k) for m in measured) for k in
                ("params", "grads", "optimizer", "activations", "activations_raw", "total", "optimizer_paged", "master_paged", "weights_host")}
        total = peak["total"]
        if arm.slimfit is not None:
            bound = worst_case_total(arm.slimfit, arm.optimizer, peak, cuda=setup.device == "cuda")
            total = bound.total
            peak["params"] += bound.weights_extra
            peak["grads"] = max(peak["grads"], bound.worst_grads)
        trainable = sum(p.numel() for g in arm.optimizer.param_groups for p in g["params"])
        working = working_set(setup, arm)
        result = ArmEstimate(
            name=name, method="fake-tensor run", note=arm.note, weights=peak["params"], gradients=peak["grads"],
            optimizer=peak["optimizer"], optimizer_host=peak["optimizer_paged"] + peak["master_paged"],
            weights_host=peak["weights_host"],
            activations_stored=peak["activations"], activations_raw=peak["activations_raw"],
            logits_and_loss=logits_and_loss(setup, arm), meter_total=total, working_set=working,
            device_total=total + working, trainable=trainable, slimfit_config=arm.slimfit_config,
        )
        arm.meter.close()
        if arm.cleanup is not None:
            arm.cleanup()
    return result


@dataclass(frozen=True)
class StepBound:
    """A SlimFit arm's steady total: the measured peak raised to the worst step its config allows."""

    total: int
    weights_extra: int = 0  # frozen_weights: int8: more full-precision copies than the measured steps held
    gradients_extra: int = 0  # under paging: gradient bytes added to the measured peak
    worst_grads: int = 0  # the most gradient bytes a step may hold at once (0 without paging)


def worst_case_total(slimfit: Any, optimizer: torch.optim.Optimizer, peak: Mapping[str, int], cuda: bool = True) -> StepBound:
    """The measured ``peak`` (the meter's per-category maxima over the measured steps and their
    ``total``) raised to what any draw of the config could hold (``benchmarks/memory.py`` uses it
    too). Weights: ``worst_case_weights``. Under paging, stepped after backward, the step holds
    every trained gradient at the end of backward: the measured peak gets the gradient shortfall,
    and the step itself is bounded by weights + worst gradients + one chunk's state
    (``worst_case_step``). Stepped in backward, gradients and a chunk exist only while units are
    stepped, at most two units' gradients and one chunk at a time: both are added to the measured
    peak whatever it held (an upper bound: the measured peak moment may have held some)."""
    weights_extra = max(0, worst_case_weights(slimfit) - peak["params"]) if slimfit.frozen_int8 is not None else 0
    total = peak["total"] + weights_extra
    if slimfit.controller.backend.paging is None:
        return StepBound(total, weights_extra)
    worst_grads, worst_chunk = worst_case_step(slimfit, optimizer, cuda=cuda)
    if _steps_in_backward(slimfit):
        return StepBound(total + worst_grads + worst_chunk, weights_extra, worst_grads, worst_grads)
    extra = max(0, worst_grads - peak["grads"])
    bound = max(total + extra, peak["params"] + weights_extra + worst_grads + worst_chunk)
    return StepBound(bound, weights_extra, extra, worst_grads)


def _steps_in_backward(slimfit: Any) -> bool:
    from .step_in_backward import InBackwardStepBackend

    return isinstance(slimfit.controller.backend, InBackwardStepBackend)


def worst_case_step(slimfit: Any, optimizer: torch.optim.Optimizer, cuda: bool = True) -> tuple[int, int]:
    """(gradient bytes, device-resident state bytes) one step may hold at once under paging,
    whatever units were drawn. Stepped after backward: gradients of everything not schedulable
    plus the step's budget (ILS ``budget: parameters``) or the largest units as many as it picks.
    Stepped in backward (``optimizer_step: in_backward``): a unit is stepped at the gradient hook
    after its last one, so the two largest units (or lone parameters) that can train. State: the
    largest chunk paging streams (of parameters a step can train: units the scheduler never picks
    are never streamed; with an element-wise optimizer at most ``chunk_bytes`` or one row, larger
    parameters being stepped by row slices) (two on CUDA, which prefetches)."""
    # what a step can ever train: every parameter but those of units the scheduler never picks
    from .never_trained import never_trained

    never = set(never_trained(slimfit.scheduler, slimfit.units.schedulable))
    idle = {id(p) for u in slimfit.units.schedulable if u.name in never for p in u.params}
    params = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in idle]
    scheduled = {id(p) for u in slimfit.units.schedulable for p in u.params}
    grads = sum(p.numel() * p.element_size() for p in params if id(p) not in scheduled)
    strategy = slimfit.controller.scheduler.strategy
    size = slimfit.units.schedulable[0].params[0].element_size()
    if getattr(strategy, "budget", "units") == "parameters":
        grads += strategy.step_budget([u.numel for u in slimfit.units.schedulable]) * size
    else:
        picked = len(slimfit.controller.trainable)
        largest = sorted(slimfit.units.schedulable, key=lambda u: u.numel, reverse=True)[:picked]
        grads += sum(p.numel() * p.element_size() for u in largest for p in u.params)
    if _steps_in_backward(slimfit):
        trainable = {id(p) for p in params}
        in_units = {id(p) for u in slimfit.units.all for p in u.params}
        groups = [sum(p.numel() * p.element_size() for p in u.params if id(p) in trainable) for u in slimfit.units.all]
        groups += [p.numel() * p.element_size() for p in params if id(p) not in in_units]
        groups.sort(reverse=True)
        grads, stepped = min(grads, sum(groups[:2])), min(grads, groups[0])
    else:
        stepped = grads  # every chunk of the step's gradients is stepped after backward
    paging = slimfit.controller.backend.paging
    # the largest chunk: a parameter larger than chunk_bytes is a chunk of its own, or with an
    # element-wise optimizer stepped a slice of rows (at least one row) at a time and never prefetched
    sliced = paging.steps_by_rows()
    if paging.masters is None:
        largest_param = max(_step_numel(p, sliced) * p.element_size() for p in params)
        chunk = min(max(paging.chunk_bytes, largest_param), stepped)  # a chunk holds no more than is stepped at once
        chunk_state = 2 * chunk + 64  # two moments (+ step counts)
    else:  # chunks count fp32 masters; the one stepped holds its masters, two fp32 moments and fp32
        # gradients, the one prefetched on CUDA its masters and moments
        largest_master = max(_step_numel(p, sliced) * 4 for p in params)
        chunk = min(max(paging.chunk_bytes, largest_master), stepped * 4 // size)
        return grads, 4 * chunk + 64 + (3 * chunk + 64 if cuda else 0)
    return grads, chunk_state * (2 if cuda else 1)


def first_gradients_draw(slimfit: Any) -> set[str] | None:
    """The units whose gradients backward makes first, as many as the step's budget allows, for
    one more measured step after the drawn ones: ILS ``budget: parameters`` filled from the
    output side (an LM head first, then the last block's matrices, ...; units larger than the
    budget are never drawn). Those gradients appear while nearly every saved activation is still
    held: with the chunked loss, a step that trains a vocabulary-sized head peaks there. ``None``
    for a scheduler without a parameter budget (no such step; ``worst_case_step`` still bounds
    its gradients)."""
    strategy = slimfit.controller.scheduler.strategy
    if getattr(strategy, "budget", "units") != "parameters":
        return None
    units = slimfit.units.schedulable
    left = strategy.step_budget([u.numel for u in units])
    chosen = set()
    for unit in reversed(units):  # the model's order reversed: backward's
        if unit.numel <= left:
            chosen.add(unit.name)
            left -= unit.numel
    return chosen


def worst_case_weights(slimfit: Any) -> int:
    """Device bytes of the weights one step may hold at most under ``frozen_weights: int8``: every
    weight as it is between steps (int8 codes and scales of the stored ones, the rest as they are)
    plus full-precision copies of the most stored weights a step can train: ILS ``budget:
    parameters`` trains at most its budget, other schedulers the largest units, as many as they
    pick (``benchmarks/memory.py`` uses it too)."""
    from .memory import parameter_bytes

    store = slimfit.frozen_int8
    if any(s.materialised for s in store.weights):
        raise RuntimeError("worst_case_weights is measured between steps (no weight materialised)")
    between = parameter_bytes(slimfit.model)
    full = {id(s.param): s.param.numel() * s.param.element_size() for s in store.weights}
    strategy = slimfit.controller.scheduler.strategy
    size = store.weights[0].param.element_size() if store.weights else 0
    if getattr(strategy, "budget", "units") == "parameters":
        trained = min(strategy.step_budget([u.numel for u in slimfit.units.schedulable]) * size, sum(full.values()))
    else:
        picked = len(slimfit.controller.trainable)
        largest = sorted(slimfit.units.schedulable, key=lambda u: u.numel, reverse=True)[:picked]
        trained = sum({id(p): full.get(id(p), 0) for u in largest for p in u.params}.values())  # a tied weight once
    return between + trained


def _step_numel(param: torch.Tensor, sliced: bool) -> int:
    """Elements of ``param`` the step holds at once: one row when large ones are stepped by rows."""
    return math.prod(param.shape[1:]) if sliced and param.dim() else param.numel()


def logits_and_loss(setup: Setup, arm: Arm) -> int:
    """What cross-entropy keeps of the logits for backward on the standard path: its fp32
    log-probabilities, tokens x vocab (raw, before any compression; by shape). 0 for a
    classifier, and with the chunked loss (which keeps only the hidden states)."""
    if setup.task != "causal-lm" or arm.chunked is not None:
        return 0
    return setup.batch * setup.seq_len * setup.config.vocab_size * 4


def working_set(setup: Setup, arm: Arm) -> int:
    """Temporaries the meter does not count, by formula. A causal LM: the forward's logits in
    the compute dtype and their fp32 upcast (alive together until the loss is taken), or with
    the chunked loss one chunk's fp32 logits and their gradient. A classifier: 0 (its largest
    temporary, one block's, is small next to its saved activations). With ``frozen_weights:
    int8``, plus the largest stored matrix dequantised for its layer (and its autocast copy
    when the weights are fp32); under the chunked loss a frozen LM head is dequantised a slice of
    rows at a time (``frozen_int8.ROW_CHUNK_BYTES`` of fp32 rows), so only a slice of it counts.
    (The fp32 dequantisation temporary, bounded the same way, is not counted.)"""
    from . import frozen_int8

    compute = 2 if (arm.autocast or arm.model.dtype == torch.bfloat16) else 4
    dequantised = 0  # frozen_weights: int8: the largest frozen matrix, dequantised (and autocast) for its layer
    store = arm.slimfit.frozen_int8 if arm.slimfit is not None else None
    if store is not None and store.weights:
        model = arm.model
        head = getattr(model.get_output_embeddings(), "weight", None) if hasattr(model, "get_output_embeddings") else None
        embedding = getattr(model.get_input_embeddings(), "weight", None) if hasattr(model, "get_input_embeddings") else None

        def held(stored) -> int:  # elements of ``stored`` dequantised at once
            rows, width = stored.param.shape
            if stored.param is head and arm.chunked is not None:  # the chunked loss: a slice of rows
                return min(rows, max(1, frozen_int8.ROW_CHUNK_BYTES // (4 * width))) * width
            if stored.param is embedding and stored.param is not head:  # a lookup: the rows of the batch
                return min(rows, setup.batch * setup.seq_len) * width
            return stored.param.numel()

        largest = max(held(s) for s in store.weights)
        size = store.weights[0].param.element_size()
        dequantised = largest * (size + (compute if compute < size else 0))
    if setup.task != "causal-lm":
        return dequantised
    vocab = setup.config.vocab_size
    tokens = setup.batch * setup.seq_len
    if arm.chunked is not None:
        return dequantised + 2 * min(arm.chunked, tokens) * vocab * 4
    return dequantised + tokens * vocab * (compute + 4)


def gpu_fits(device_total: int) -> dict[str, bool]:
    """Which GPUs (N GB cards hold N GiB) it fits, leaving ``CUDA_RESERVE`` for the context."""
    return {f"{gb}GB": device_total + CUDA_RESERVE <= gb * GiB for gb in GPU_SIZES_GB}


def default_jobs(arms: int) -> int:
    """Worker processes for ``arms`` arms: one per CPU core, at most one per arm."""
    return max(1, min(arms, os.cpu_count() or 1))


def _run_arm_timed(setup: Setup, name: str) -> tuple[ArmEstimate, float]:
    start = time.perf_counter()
    return run_arm(setup, name), time.perf_counter() - start


def estimate(setup: Setup, arms: list[str] | None = None, progress: Callable[[str], None] | None = None,
             jobs: int | None = 1) -> list[ArmEstimate]:
    """Estimate each arm (default: all of ``ARMS``; ``full_pure_bf16`` only in bf16).

    ``jobs``: arms run in that many worker processes at once (``None``: ``default_jobs``, one per
    core, as the CLI does; 1: in this process, where plugins registered in code are seen). Each
    arm builds its own model from the same seed, so the figures are the same as one after another
    (tested); an arm's fake-tensor step is Python-bound, so on 2 cores an 8B config takes about
    half the time. Real tensors (``setup.fake`` false) always run one by one.
    """
    arms = list(arms or [a for a in ARMS if setup.bf16 or a != "full_pure_bf16"])
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    jobs = default_jobs(len(arms)) if jobs is None else jobs
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give at least 1")

    def done(name: str, result: ArmEstimate, seconds: float) -> None:
        results[name] = result
        if progress is not None:
            progress(f"{name}: {format_gib(result.device_total)} ({seconds:.1f} s)")

    results: dict[str, ArmEstimate] = {}
    if jobs == 1 or len(arms) == 1 or not setup.fake:
        for name in arms:
            done(name, *_run_arm_timed(setup, name))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # SlimFit arms run more steps: started first, they do not finish last alone
        order = sorted(arms, key=lambda a: not a.startswith("slimfit"))
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads
        with ProcessPoolExecutor(max_workers=min(jobs, len(arms)), mp_context=context) as pool:
            futures = {pool.submit(_run_arm_timed, setup, name): name for name in order}
            try:
                for future in as_completed(futures):
                    done(futures[future], *future.result())
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)  # an arm failed: the others need not finish
                raise
    out = [results[a] for a in arms]
    for result in out:
        result.fits = gpu_fits(result.device_total)
    return out


def format_gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def render(setup: Setup, results: list[ArmEstimate]) -> str:
    """The table: one row per arm, categories in GiB, which GPUs it fits."""
    from rich.console import Console
    from rich.table import Table

    title = (f"{setup.model_dir} ({type(setup.config).__name__}, {setup.task}), batch {setup.batch} x {setup.seq_len} tokens, "
             f"{setup.precision}: device memory at steady state")
    table = Table(title=title, header_style="bold")
    table.add_column("arm")
    for label in CATEGORY_LABELS.values():
        table.add_column(label, justify="right")
    table.add_column("fits", justify="left")
    for r in results:
        cells = [f"{getattr(r, key) / GiB:.2f}" for key in CATEGORY_LABELS]
        fits = ", ".join(k for k, ok in r.fits.items() if ok) or "none of " + "/".join(map(str, GPU_SIZES_GB)) + " GB"
        table.add_row(r.name, *cells, fits)
    out = Console(width=220, force_terminal=False, color_system=None, record=True, file=open("/dev/null", "w"))
    out.print(table)
    notes = [f"  {r.name}: {r.note}" for r in results]
    footer = ("GiB. * working set by formula (logits temporaries); everything else measured by running the step on fake "
              f"tensors through MemoryMeter. Fits: device total + {CUDA_RESERVE / GiB:.1f} GiB CUDA context <= the card's GiB.")
    return out.export_text() + "\n".join(notes) + "\n" + footer


def to_json(setup: Setup, results: list[ArmEstimate]) -> dict[str, Any]:
    return {
        "model": str(setup.model_dir), "architecture": type(setup.config).__name__, "task": setup.task,
        "batch": setup.batch, "seq_len": setup.seq_len, "precision": setup.precision, "device": setup.device,
        "units": "bytes", "gpu_sizes_gb": list(GPU_SIZES_GB), "cuda_reserve_bytes": CUDA_RESERVE,
        "arms": [asdict(r) for r in results],
    }


# ------------------------------------------------------------------------- budget
def parse_size(text: str) -> int:
    """``24GiB``, ``24GB`` (as cards are sold: GiB), ``1.5TiB``, ``800MiB``, or bytes (a bare number
    under 1 MiB is refused: ``24`` is a GPU size missing its unit)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"--budget {text!r}: write a size such as 24GiB or 12GB")
    if match.group(2) is None and float(match.group(1)) < 2**20:  # "--budget 24" means 24 GiB, not bytes
        raise ConfigError(f"--budget {text!r}: no unit, so {match.group(1)} bytes; write the unit, e.g. {match.group(1)}GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit[0]]
    return int(number * scale)


def budget_ladder(setup: Setup) -> list[tuple[str, dict[str, Any]]]:
    """SlimFit configs from least to most memory-saving; the first that fits is chosen.

    Each rung keeps the previous one's settings: the base config as the recipe runs it (in bf16
    with paging: bf16 weights, fp32 masters on host, ``slimfit_default_config``); + optimizer
    paging; + fp32 masters on host (bf16); + every block checkpointed; + the chunked loss at 256
    tokens a chunk (causal LM; ``BEST_LOSS_CHUNK``, unless the config's chunks are no larger);
    + the optimizer step in backward (``BEST_STEP``: exact, but it refuses gradient accumulation
    and clipping) with a never-trained input embedding on host (``BEST_PLACEMENT``, exact: it
    applies once a freeze ratio leaves the embedding untrained); then freeze ratios 0.9 and 0.95,
    frozen weights in int8, freeze ratio 0.98, each with all of the above. Rungs that cost time come after those that cost none
    (paging is bit-identical and cheap; masters on host cost host memory), quality-changing rungs
    last."""
    base = slimfit_default_config(setup)
    rungs: list[tuple[str, dict[str, Any]]] = [("the base config", copy.deepcopy(base))]
    config = copy.deepcopy(base)
    config["optimizer_paging"] = True
    rungs.append(("+ optimizer paging", copy.deepcopy(config)))
    if setup.bf16:
        config["master_weights"] = "host"
        rungs.append(("+ bf16 weights, fp32 masters on host", copy.deepcopy(config)))
    config["checkpointing"] = {"blocks": "all"}
    rungs.append(("+ every block checkpointed", copy.deepcopy(config)))
    if setup.task == "causal-lm" and _loss_chunk(config.get("chunked_loss")) > BEST_LOSS_CHUNK["chunk_size"]:
        # exact at any size; a quarter of the default chunk's logits (at 8B, 2 x 2048: 0.24 vs 0.98 GiB)
        given = config.get("chunked_loss")
        keeps_standard = given == "auto" or (isinstance(given, dict) and given.get("fallback") == "standard")
        config["chunked_loss"] = {**BEST_LOSS_CHUNK, **({"fallback": "standard"} if keeps_standard else {})}
        rungs.append((f"+ chunked loss, {BEST_LOSS_CHUNK['chunk_size']} tokens a chunk", copy.deepcopy(config)))
    config.update(BEST_STEP, **BEST_PLACEMENT)  # input_embedding: auto acts once a ratio leaves the embedding untrained
    rungs.append(("+ optimizer step in backward, input_embedding: auto", copy.deepcopy(config)))
    current = float((config.get("scheduler") or {}).get("freeze_ratio", 0.9))
    for ratio in (0.9, 0.95, 0.98):
        if ratio == 0.98 and config.get("frozen_weights") != "int8":
            config = copy.deepcopy(config)  # frozen matrices in int8 before the last ratio: 7.5 GiB less at 8B
            config["frozen_weights"] = "int8"
            rungs.append(("+ frozen weights in int8", config))
        if ratio > current + 1e-9:
            config = copy.deepcopy(config)
            config["scheduler"] = {**(config.get("scheduler") or {"name": "ils"}), "freeze_ratio": ratio}
            rungs.append((f"+ freeze_ratio {ratio}", config))
    unique: list[tuple[str, dict[str, Any]]] = []
    for rung, config in rungs:  # a setting the base already has adds no rung
        if not unique or config != unique[-1][1]:
            unique.append((rung, config))
    return unique


def _loss_chunk(setting: Any) -> float:
    """Tokens a chunk of the loss ``setting`` computes at once (infinite for the standard loss)."""
    from .config import load_config

    chunked = load_config({"chunked_loss": setting}).chunked_loss if setting not in (None, False) else None
    return math.inf if chunked is None else chunked.chunk_size


@dataclass
class BudgetChoice:
    rung: str
    config: dict[str, Any]
    estimate: ArmEstimate
    tried: list[tuple[str, int]]  # (rung, device total) of each rung estimated


def fit_budget(setup: Setup, budget: int, progress: Callable[[str], None] | None = None) -> BudgetChoice:
    """The first rung of ``budget_ladder`` whose device total (+ CUDA context) is within ``budget``."""
    tried: list[tuple[str, int]] = []
    for rung, config in budget_ladder(setup):
        result = run_arm(setup, "budget", builder=lambda s: slimfit_arm(s, config, note=rung))
        tried.append((rung, result.device_total))
        if progress is not None:
            progress(f"{rung}: {format_gib(result.device_total)}")
        if result.device_total + CUDA_RESERVE <= budget:
            return BudgetChoice(rung, config, result, tried)
    smallest = min(total for _, total in tried)
    raise ConfigError(
        f"--budget {format_gib(budget)}: no SlimFit config fits; the smallest found needs {format_gib(smallest)} "
        f"+ {format_gib(CUDA_RESERVE)} CUDA context (the last rung of the ladder). Use a bigger GPU, a shorter "
        f"--seq-len or a smaller --batch."
    )


def weight_bytes(setup: Setup) -> int:
    """Bytes of the model's weights in the smallest form the ladder keeps them: matrices as int8
    codes + an fp32 scale a row (``frozen_weights: int8``), the rest bf16 in bf16, else fp32."""
    with shape_only():
        model = setup.build_model()
        params = list({id(p): p for p in model.parameters()}.values())
    size = 2 if setup.bf16 else 4
    return sum(p.numel() + 4 * p.shape[0] if p.dim() >= 2 else p.numel() * size for p in params)


def write_config(config: Mapping[str, Any], path: Path, header: str = "") -> None:
    """Write ``config`` as YAML that ``SlimFit.from_config`` loads (checked before writing)."""
    from .config import load_config

    load_config(dict(config))
    text = (header + "\n" if header else "") + yaml.safe_dump(dict(config), sort_keys=False)
    Path(path).write_text(text)


def never_trained_units(setup: Setup, config: Mapping[str, Any]) -> list[str]:
    """Units ``config``'s scheduler can never pick on this model (larger than its step budget):
    they keep their loaded weights, which a user choosing a config by memory should know."""
    from .never_trained import never_trained
    from .slimfit import SlimFit

    with shape_only():
        slimfit = SlimFit.from_config(dict(config))
        slimfit.prepare_model(setup.build_model())
        return list(never_trained(slimfit.scheduler, slimfit.units.schedulable))
