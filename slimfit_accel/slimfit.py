"""``SlimFit``: the object a training loop talks to. Thin: it wires the other modules together.

Example, in an Accelerate loop::

    slimfit = SlimFit.from_config("slimfit.yaml")
    model = slimfit.prepare_model(model)                 # before accelerator.prepare
    accelerator = Accelerator(kwargs_handlers=SlimFit.kwargs_handlers())
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    slimfit.attach(accelerator, model, optimizer, total_steps=len(loader))
    for batch in loader:
        with accelerator.accumulate(model), slimfit.step():
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    print(slimfit.report().render())
"""

from __future__ import annotations

import os
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .checkpointing import BlockCheckpointing
from .compression import CompressionEngine, CompressionPolicy, slimfit_policy, slimfit_reference_policy
from .config import SlimFitConfig, load_config
from .controller import FreezeController
from .errors import IntegrationError
from .frozen_int8 import FrozenInt8
from .frozen_int8 import refuse_unsupported as refuse_int8_under
from .host_embedding import HostEmbedding, why_not_on_host
from .host_embedding import refuse as refuse_host_embedding
from .integrations.fsdp import FSDP1_REFUSAL, FSDP2StepBackend, fsdp_version, init_fsdp2, rebind_units
from .master_weights import MasterWeights, check_precision, hand_over_to_deepspeed
from .memory import MemoryMeter, gather_ranks
from .never_trained import never_trained, startup_message
from .paging import OptimizerPaging
from .plugins import StrategyRegistry
from .report import SlimFitReport, build_report
from .row_units import RowLayout
from .step_in_backward import InBackwardStepBackend, ddp_of, refuse_unsupported
from .stepping import StepBackend, TorchStepBackend, reentrant_checkpointing
from .units import ParameterSummary, UnitSet, discover_units, full_numel


class SlimFit:
    """Per-step freezing from training dynamics, for a model trained with Accelerate."""

    def __init__(self, config: SlimFitConfig, registry: StrategyRegistry | None = None, origin: str = "config"):
        self.config = config
        self.registry = registry or StrategyRegistry.load()
        # Build the strategies now: a bad name or option fails before any model is touched.
        self.scorer = self.registry.build("scorer", config.scorer, where=f"{origin}: scorer")
        self.scheduler = self.registry.build("scheduler", config.scheduler, where=f"{origin}: scheduler")
        self.policy = _compression_policy(config.compression)
        if self.policy is not None:
            for spec in [rule.compressor for rule in self.policy.rules] + [self.policy.default]:
                self.registry.build("compressor", spec, where=f"{origin}: compression")
        self.compression: CompressionEngine | None = None
        self.memory: MemoryMeter | None = None
        self.master_weights: MasterWeights | None = None
        self.checkpointing: BlockCheckpointing | None = None
        self.frozen_int8: FrozenInt8 | None = None
        self.host_embedding: HostEmbedding | None = None
        self.model: nn.Module | None = None
        self.units: UnitSet | None = None
        self._trainable: dict[int, int] = {}
        self.controller: FreezeController | None = None
        self.accelerator = None

    @classmethod
    def from_config(
        cls, source: str | Path | Mapping[str, Any] | SlimFitConfig, *, plugins: Iterable[Any] = (),
        memory_meter: str | None = None,
    ) -> "SlimFit":
        """Build from a YAML path, a dict or a ``SlimFitConfig``.

        ``plugins``: extra plugin modules/objects to register besides the installed ones.
        ``memory_meter``: replaces the config's setting (``"always"``: what a benchmark or the
        recipe needs to report exact memory of every step).
        """
        origin = str(source) if isinstance(source, (str, Path)) else "config"
        config = load_config(source)
        if memory_meter is not None:
            setting = load_config({"memory_meter": memory_meter}).memory_meter  # validated alone
            config = config.model_copy(update={"memory_meter": setting})
        return cls(config, StrategyRegistry.load(plugins), origin=origin)

    @staticmethod
    def kwargs_handlers() -> list:
        """Accelerator kwargs SlimFit needs: DDP must tolerate parameters without gradients."""
        from accelerate.utils import DistributedDataParallelKwargs

        return [DistributedDataParallelKwargs(find_unused_parameters=True)]

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Find the units and make each trainable; call before ``accelerator.prepare``.

        Candidates are the parameters trainable now (``units.candidates: trainable``): what the
        user froze, such as a PEFT base model, stays frozen and never becomes a unit.
        DDP and DeepSpeed record which parameters train when they wrap the model, so every unit
        must be trainable then; freezing is applied per step afterwards.
        With ``chunked_loss`` set, a causal LM's loss is computed without its logits from now on
        (``auto``: where the model allows it, else a warning says why not).
        """
        chunked = self.config.chunked_loss
        if chunked is not None:
            from .chunked_loss import enable_chunked_loss, unsupported  # reads transformers' loss: imported when used

            reason = unsupported(model) if chunked.fallback == "standard" else None
            if reason is None:
                enable_chunked_loss(model, chunked.chunk_size, chunked.backend)
            else:
                warnings.warn(f"SlimFit: chunked_loss: auto: {reason}; this model computes its loss the standard "
                              f"way (its full logits are kept for backward)", stacklevel=2)
        self.units = discover_units(model, self.config.units)
        self.model = model
        for unit in self.units.all:
            for param in unit.params:
                param.requires_grad_(True)
        self._trainable = {id(p): full_numel(p) for p in model.parameters() if p.requires_grad}
        if self.config.master_weights == "host":  # fp32 masters to host, then the model in bf16
            self.master_weights = MasterWeights.cast_model(model)
        return model

    def summary(self) -> ParameterSummary:
        """Parameter counts: trainable (as PEFT counts them), SlimFit candidates, never trained (units
        the scheduler cannot pick), always trained, trained this step. ``print(slimfit.summary())``
        gives a ``print_trainable_parameters`` line."""
        if self.units is None:
            raise IntegrationError("nothing to summarise: call slimfit.prepare_model(model) first")
        never = set(never_trained(self.scheduler, self.units.schedulable))
        never_numel = sum(u.numel for u in self.units.schedulable if u.name in never)
        candidates = sum(u.numel for u in self.units.schedulable) - never_numel
        always = sum(self._trainable.values()) - candidates - never_numel
        if self.controller is None:
            this_step = candidates
        else:
            picked = set(self.controller.trainable)
            this_step = sum(u.numel for u in self.units.schedulable if u.name in picked)
        return ParameterSummary(
            total=sum(full_numel(p) for p in self.model.parameters()),
            trainable=sum(self._trainable.values()),
            candidates=candidates,
            always_trained=always,
            trained_this_step=always + this_step,
            never_trained=never_numel,
        )

    def print_trainable_parameters(self) -> None:
        """Print ``summary()`` as one line, like PEFT's method of the same name."""
        print(self.summary())

    def attach(self, accelerator: Any, model: nn.Module, optimizer: Any, total_steps: int | None = None) -> None:
        """Start freezing: pick the backend for this setup. The first decision is taken when
        the first step begins, so ``accelerator.load_state`` may come after ``attach``.

        ``accelerator`` may be None for a plain PyTorch loop. ``total_steps`` (planned optimizer
        steps) is needed by schedulers that follow training progress.
        """
        if self.units is None:
            raise IntegrationError("call slimfit.prepare_model(model) before accelerator.prepare and attach()")
        never = never_trained(self.scheduler, self.units.schedulable)
        if never:  # said once, before training: these units keep their loaded weights
            total = sum(full_numel(p) for p in self.model.parameters())
            warnings.warn(startup_message(self.scheduler, never, self.units.schedulable, total), stacklevel=2)
        if accelerator is not None:
            check_launch(accelerator.distributed_type, accelerator.num_processes)
        if self.master_weights is not None:
            check_precision(accelerator)
        sharding = fsdp_version(accelerator, model)
        if self.config.frozen_weights == "int8":
            refuse_int8_under(accelerator, sharding)
        placement = self.config.input_embedding
        off_device = None if placement == "device" else why_not_on_host(self.model, self.units, never, accelerator)
        if placement == "host" and off_device is not None:
            raise refuse_host_embedding(off_device)
        if placement == "auto" and off_device is not None:
            warnings.warn(f"SlimFit: input_embedding: auto leaves the input embedding on the device: {off_device}", stacklevel=2)
        if self.config.optimizer_step == "in_backward":
            refuse_unsupported(accelerator, model, sharding, getattr(self.config.units, "row_chunks", None) is not None)
        if sharding == 1:
            raise IntegrationError(FSDP1_REFUSAL)
        rows = RowLayout.of(self.units.all)  # before FSDP2 swaps the parameters: _backend refuses it
        if sharding == 2:
            # fully_shard swapped every parameter: the units follow, by name; FSDP2's lazy init
            # runs now, with every unit trainable (integrations/fsdp.py says why).
            self.units = rebind_units(self.units, model)
            init_fsdp2(model)
        backend = self._backend(accelerator, model, optimizer, fsdp2=sharding == 2, rows=rows)
        # In backward the scorer sees each unit as its gradient completes (step_in_backward.py).
        scorer = backend.scorer_for(self.scorer) if isinstance(backend, InBackwardStepBackend) else self.scorer
        self.controller = FreezeController(
            self.units, scorer, self.scheduler, self.registry, seed=self.config.seed, total_steps=total_steps,
            lr_scale=self.config.lr_scale, rows=rows,
        )
        self.controller.bind(backend)
        if placement != "device" and off_device is None:  # before int8 storage: a host weight is not stored
            self.host_embedding = HostEmbedding.attach(self.model)
        if self.config.frozen_weights == "int8":  # after bind: its step post-hook runs after the backend's
            self.frozen_int8 = FrozenInt8.attach(self.model, self.units, masters=self.master_weights,
                                                 optimizer=getattr(optimizer, "optimizer", optimizer))
        if self.policy is not None:
            factories = {name: reg.factory for name, reg in self.registry.strategies["compressor"].items()}
            self.compression = CompressionEngine(self.model, self.policy, compressors=factories).attach()
        # Without compression the meter counts what autograd saves with an engine of its own;
        # sampled (memory_meter: {every: N}) its hooks exist only in the steps it measures.
        every = self.config.meter_every
        if every:
            self.memory = MemoryMeter(self.model, optimizer, engine=self.compression, masters=self.master_weights,
                                      every=every, host_weights=self.host_embedding)
            paging = getattr(backend, "paging", None)
            if paging is not None:
                paging.listeners.append(self.memory.optimizer_resident_changed)
        if self.config.checkpointing is not None and _transformers_checkpointing(self.model):
            warnings.warn(
                "SlimFit: the model has transformers' gradient checkpointing on, which already recomputes every "
                "block; the config's checkpointing key is not applied (else blocks would be recomputed twice). "
                "Remove one of the two to silence this.",
                stacklevel=2,
            )
        elif self.config.checkpointing is not None:
            # recomputed tensors count as live activations of the meter's engine while alive
            meter_engine = self.memory.engine if self.memory is not None else None
            counter = meter_engine._counter if meter_engine is not None else None  # noqa: SLF001
            self.checkpointing = BlockCheckpointing(self.model, self.config.checkpointing.blocks, counter,
                                                    exact_input=self.config.checkpointing.input == "exact").attach()
            if isinstance(backend, InBackwardStepBackend):  # no finished gradient held through a recomputation
                self.checkpointing.before_recompute.append(backend.flush)
        if accelerator is not None:
            accelerator.register_for_checkpointing(self.controller)
        self.accelerator = accelerator

    @contextmanager
    def step(self) -> Iterator[None]:
        """Wrap each micro-batch (forward and backward): applies this optimizer step's freeze
        decision before the forward pass and compresses the activations saved for backward.
        Outside the block every unit is trainable (what checkpoints record)."""
        if self.controller is None:
            raise IntegrationError("call slimfit.attach(accelerator, model, optimizer) before training")
        self.controller.begin_step()
        if self.frozen_int8 is not None:  # the units trained now in full precision, the others int8
            self.frozen_int8.follow_requires_grad()
        try:
            with ExitStack() as stack:
                if self.compression is not None:
                    stack.enter_context(self.compression.step())
                if self.memory is not None and self.controller.step % self.memory.every == 0:
                    stack.enter_context(self.memory.step(optimizer_step=self.controller.step))
                yield
        finally:
            self.controller.end_step()

    def report(self, gather: bool = False) -> SlimFitReport:
        """What was frozen and trained, and memory by category (saved activations before and after
        compression); ``.render()`` gives tables, ``.to_dict()`` the same as data. Memory is
        measured as ``memory_meter`` says (default: every 10th optimizer step); with ``off`` the
        report's ``memory`` is None and ``memory_note`` says it was not measured.

        Memory figures are this rank's (under ZeRO: its partitions), and labelled so.
        ``gather=True`` adds the last step summed over all ranks; it is a collective, so then
        call ``report`` on every rank.
        """
        if self.controller is None:
            raise IntegrationError("nothing to report: attach() was not called")
        memory = self.memory.summary() if self.memory is not None else None
        if gather and memory is not None:
            memory = gather_ranks(memory)
        note = "" if memory is not None else "memory not measured (memory_meter: off in the SlimFit config)"
        return build_report(self.controller, memory, never_trained(self.scheduler, self.units.schedulable), memory_note=note)

    def detach(self) -> None:
        """Stop: every unit trainable again (parameters the user froze stay frozen: they are not
        units), optimizer and compression hooks removed, the model's own loss back."""
        if self.config.chunked_loss is not None and self.model is not None:
            from .chunked_loss import disable_chunked_loss

            disable_chunked_loss(self.model)
        if self.checkpointing is not None:
            self.checkpointing.detach()
            self.checkpointing = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.compression is not None:
            self.compression.detach()
            self.compression = None
        if self.frozen_int8 is not None:  # every weight in full precision again, from its master
            self.frozen_int8.detach()
            self.frozen_int8 = None
        if self.host_embedding is not None:  # back on the device with the rest of the model
            self.host_embedding.detach()
            self.host_embedding = None
        if self.controller is not None:
            self.controller.unbind()  # with master_weights: the parameters are their fp32 masters again
            self.master_weights = None
            for unit in self.units.all:
                for param in unit.params:
                    param.requires_grad_(True)
            self.controller = None

    def _backend(
        self, accelerator: Any, model: nn.Module, optimizer: Any, fsdp2: bool = False, rows: RowLayout | None = None
    ) -> StepBackend:
        from accelerate.utils import DistributedType

        deepspeed = accelerator is not None and accelerator.distributed_type == DistributedType.DEEPSPEED
        if rows is not None and (deepspeed or fsdp2):
            raise IntegrationError(
                f"units.row_chunks steps a split matrix's rows through the streamed optimizer step, which "
                f"{'DeepSpeed ZeRO' if deepspeed else 'FSDP2'} does not run (its optimizer state is sharded "
                f"flat); remove units.row_chunks from the SlimFit config."
            )
        if deepspeed:
            from .integrations.deepspeed import ZeroStepBackend

            if self.config.optimizer_paging:
                # A no-op, not an error, so one config (the packaged default) runs on every backend.
                warnings.warn(
                    "optimizer_paging has no effect under DeepSpeed ZeRO: its optimizer state lives in flat "
                    "partitions, one per rank, that cannot be paged by unit. To keep it on host, use DeepSpeed's "
                    "offload_optimizer (e.g. accelerate_configs/zero2_offload.yaml).",
                    stacklevel=3,
                )
            if self.master_weights is not None:
                hand_over_to_deepspeed(self.master_weights, accelerator.deepspeed_engine_wrapped.engine)
                self.master_weights = None

            return ZeroStepBackend(accelerator.deepspeed_engine_wrapped.engine)
        if isinstance(model, nn.parallel.DistributedDataParallel) and not model.find_unused_parameters:
            raise IntegrationError(
                "DDP was built with find_unused_parameters=False, so it would wait for gradients of "
                "frozen units. Pass kwargs_handlers=SlimFit.kwargs_handlers() to Accelerator(...)."
            )
        if isinstance(model, nn.parallel.DistributedDataParallel) and reentrant_checkpointing(model.module):
            raise IntegrationError(
                "gradient checkpointing with use_reentrant=True does not work under DDP with SlimFit: "
                "frozen units need find_unused_parameters=True, which reentrant backward breaks. Enable it "
                "with model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})."
            )
        torch_optimizer = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(torch_optimizer, torch.optim.Optimizer):
            raise IntegrationError(f"unsupported optimizer {type(torch_optimizer).__name__}: expected a torch.optim.Optimizer")
        in_optimizer = {id(p) for group in torch_optimizer.param_groups for p in group["params"]}
        missing = [name for unit in self.units.all for name, p in zip(unit.param_names, unit.params) if id(p) not in in_optimizer]
        if missing:
            raise IntegrationError(
                f"{len(missing)} unit parameters are not in the optimizer (e.g. {missing[0]!r}). Create the "
                f"optimizer after slimfit.prepare_model(model), over model.parameters()."
            )
        if self.master_weights is not None:
            if fsdp2:
                raise IntegrationError(
                    "master_weights: host is not supported under FSDP2: use FSDP2's own mixed precision "
                    "(MixedPrecisionPolicy(param_dtype=torch.bfloat16): fp32 sharded masters, bf16 compute) "
                    "and remove master_weights from the SlimFit config."
                )
            self.master_weights.keep_only([p for group in torch_optimizer.param_groups for p in group["params"]])
            if isinstance(model, nn.parallel.DistributedDataParallel):
                self.master_weights.broadcast(0)  # as DDP took rank 0's weights
        if fsdp2:
            if self.config.optimizer_paging:
                warnings.warn(
                    "optimizer_paging has no effect under FSDP2: each rank already holds only its shard of the "
                    "optimizer state. To keep parameters, gradients and optimizer state on host, use FSDP2's CPU "
                    "offload (fsdp_offload_params: true in the Accelerate config).",
                    stacklevel=3,
                )
            return FSDP2StepBackend(torch_optimizer)
        if rows is not None:
            rows.check_optimizer(torch_optimizer)
        paging = (
            OptimizerPaging(torch_optimizer, chunk_bytes=int(self.config.paging_chunk_mib * 2**20), masters=self.master_weights, rows=rows)
            if self.config.optimizer_paging
            else None
        )
        if self.config.optimizer_step == "in_backward":
            return InBackwardStepBackend(torch_optimizer, self.units, paging=paging, ddp=ddp_of(accelerator, model))
        return TorchStepBackend(torch_optimizer, paging=paging)


def _transformers_checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` has transformers' gradient checkpointing on (``gradient_checkpointing_enable``)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def make_accelerator(gradient_accumulation_steps: int = 1, **kwargs: Any):
    """An ``Accelerator`` set up for SlimFit, which also works with no GPU.

    DDP must not wait for gradients of frozen units (``find_unused_parameters``). Without a GPU,
    Accelerate sets up a process group only when told to: ``cpu=True`` for DDP (else each
    ``torchrun`` process runs alone), gloo for DeepSpeed (``cpu=True`` would switch DeepSpeed
    off). Other keyword arguments go to ``Accelerator``. Example::

        accelerator = make_accelerator(gradient_accumulation_steps=2, mixed_precision="bf16")
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = list(kwargs.pop("kwargs_handlers", None) or [])
    if not any(isinstance(h, DistributedDataParallelKwargs) for h in handlers):
        handlers += SlimFit.kwargs_handlers()
    if not torch.cuda.is_available():
        deepspeed = kwargs.get("deepspeed_plugin") is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        kwargs.setdefault("cpu", not deepspeed)
        launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 or int(os.environ.get("WORLD_SIZE", 1)) > 1
        if launched and not any(isinstance(h, InitProcessGroupKwargs) for h in handlers):
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, kwargs_handlers=handlers, **kwargs)


def check_launch(distributed_type: Any, num_processes: int) -> None:
    """Raise if a launcher started several processes but each trains alone (the no-GPU pitfall)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and num_processes == 1:
        kind = getattr(distributed_type, "name", distributed_type)
        fix = (
            "DeepSpeed needs a gloo process group: build it with slimfit_accel.make_accelerator("
            "deepspeed_plugin=...) (for a Trainer: first, then TrainingArguments(accelerator_config="
            "{'use_configured_state': True}))"
            if kind == "DEEPSPEED"
            else "Accelerate needs cpu=True for DDP: build the Accelerator with "
            "slimfit_accel.make_accelerator(), or pass use_cpu=True to a Trainer"
        )
        raise IntegrationError(
            f"{world} processes were launched (WORLD_SIZE={world}) but this one trains alone "
            f"(DistributedType.{kind}): with no GPU, {fix}."
        )


def _compression_policy(setting: str | CompressionPolicy) -> CompressionPolicy | None:
    if isinstance(setting, CompressionPolicy):
        return setting
    return {"slimfit": slimfit_policy, "reference": slimfit_reference_policy, "none": lambda: None}[setting]()
