"""SlimFit in the Hugging Face ``Trainer`` (and trainers built on it, such as TRL's): one callback.

Example::

    from slimfit_accel.integrations.trainer import SlimFitCallback

    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[SlimFitCallback("slimfit.yaml")])
    trainer.train()                                  # the SlimFit report is printed at the end
    trainer.train(resume_from_checkpoint=True)       # continues the same freeze sequence

A callback, not a ``Trainer`` mix-in: the Trainer's events are enough to wrap forward and
backward, so any Trainer subclass works unchanged. Where the events fire (``Trainer._run_epoch``
and ``_prepare_for_training``, transformers 5.x) and what the callback does there:

- ``on_init_end`` (end of ``Trainer.__init__``): ``prepare_model``. Every unit is trainable
  while ``create_optimizer`` (it keeps only ``requires_grad`` parameters) and
  ``accelerator.prepare`` (DDP records the trainable set) run inside ``train()``.
- ``on_train_begin`` (after the optimizer exists, the model is wrapped and a checkpoint's
  optimizer state is loaded): print ``slimfit.summary()``, ``attach`` to the Trainer's
  optimizer; on resume, load the SlimFit state stored in the checkpoint.
- ``on_step_begin`` (before the first micro-batch of an optimizer step) to ``on_step_end``
  (after ``optimizer.step()`` and ``zero_grad``): one ``slimfit.step()`` block around all
  micro-batches of the step, so the freeze decision is taken once before the first forward,
  saved activations are compressed in every forward, and the optimizer step is freeze-true.
  Under gradient accumulation the Accelerate loop opens one block per micro-batch instead; the
  decisions and weights are the same (the memory report counts optimizer steps, not micro-batches).
- ``on_train_end``: the report (``callback.report``, printed on the main process), then ``detach``.

Checkpoints: the callback is an ``ExportableState``: at every save the controller's state
(step, scores, strategy and backend state) goes into the checkpoint's ``trainer_state.json``,
and ``on_train_begin`` of a resumed run reads it back from there, whether or not
``restore_callback_states_from_checkpoint`` is set.

DDP: the Trainer asks DDP to find unused parameters unless activation checkpointing is on;
SlimFit needs it (frozen units get no gradient), so that setting is checked, as transformers 4.x
and 5.x each decide it (they name the checkpointing flags differently). DeepSpeed ZeRO:
callbacks are given the module, not the Trainer's engine; the callback finds the engine that
wraps the module and steps freeze-true through it, as ``SlimFit.attach`` does under Accelerate.
With no GPU, the Trainer's own set-up leaves DeepSpeed processes each alone: set up the process
group first (``slimfit_accel.make_accelerator(deepspeed_plugin=...)``) and pass
``TrainingArguments(accelerator_config={"use_configured_state": True})``.
"""

from __future__ import annotations

import base64
import gc
import io
import weakref
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..config import SlimFitConfig, load_config
from ..errors import IntegrationError
from ..report import SlimFitReport
from ..slimfit import SlimFit
from ..step_in_backward import refuse_trainer_arguments
from ..stepping import reentrant_checkpointing

# The SlimFit that prepared a model: a callback the Trainer re-creates from its checkpointed
# state (restore_callback_states_from_checkpoint) reuses it, plugins included.
_PREPARED: "weakref.WeakKeyDictionary[nn.Module, SlimFit]" = weakref.WeakKeyDictionary()


class SlimFitCallback(TrainerCallback, ExportableState):
    """Per-step freezing and activation compression for ``transformers.Trainer``.

    ``config``: a SlimFit YAML path, a dict or a ``SlimFitConfig``. ``plugins``: extra plugin
    objects, as for ``SlimFit.from_config``. ``print_report``: print the parameter summary when
    training starts and the report when it ends (main process).
    After training, ``callback.report`` holds it; while training, ``callback.slimfit`` is the
    ``SlimFit`` (``callback.slimfit.summary()`` gives the parameter counts).
    """

    def __init__(
        self,
        config: str | Path | Mapping[str, Any] | SlimFitConfig,
        *,
        plugins: Iterable[Any] = (),
        print_report: bool = True,
    ):
        self.config = load_config(config)
        self.plugins = tuple(plugins)
        self.print_report = print_report
        self.slimfit: SlimFit | None = None
        self.report: SlimFitReport | None = None
        self._step: ExitStack | None = None

    # -- checkpoints (ExportableState) ------------------------------------------------------
    def state(self) -> dict:
        attached = self.slimfit is not None and self.slimfit.controller is not None
        return {
            "args": {"config": self.config.model_dump(mode="json")},
            "attributes": {"slimfit_state": _encode(self.slimfit.controller.state_dict()) if attached else None},
        }

    # -- events -----------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._prepare(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise IntegrationError("SlimFitCallback: the Trainer passed no model or optimizer to on_train_begin")
        if self.slimfit is None or self.slimfit.model is not model:
            self._prepare(model)  # e.g. a Trainer built with model_init
        _check_ddp(args, model)
        if self.config.optimizer_step == "in_backward":
            refuse_trainer_arguments(args)
        if self.print_report and state.is_world_process_zero:
            print(self.slimfit.summary())  # like PEFT's print_trainable_parameters, plus SlimFit's split
        self.slimfit.attach(_TrainerAccelerator(model), model, optimizer, total_steps=state.max_steps or None)
        saved = _saved_state(state, type(self).__name__)
        if saved is not None:
            self.slimfit.controller.load_state_dict(_decode(saved))
        if self.slimfit.controller.step != state.global_step:
            raise IntegrationError(
                f"SlimFitCallback: resuming at Trainer step {state.global_step} but the checkpoint's SlimFit "
                f"state is at step {self.slimfit.controller.step}; resume from a checkpoint saved with SlimFitCallback."
            )

    def on_step_begin(self, args, state, control, **kwargs):
        self._close_step()  # a step left open by an exception in the previous train() call
        self._step = ExitStack()
        self._step.enter_context(self.slimfit.step())

    def on_step_end(self, args, state, control, **kwargs):
        self._close_step()

    def on_train_end(self, args, state, control, **kwargs):
        self._close_step()
        if self.slimfit is None or self.slimfit.controller is None:
            return
        self.report = self.slimfit.report()
        if self.print_report and state.is_world_process_zero:
            print(self.report.render())
        self.slimfit.detach()

    # -- helpers ----------------------------------------------------------------------------
    def _prepare(self, model: nn.Module) -> None:
        known = _PREPARED.get(model)
        if known is not None and known.config == self.config:
            self.slimfit = known
            return
        self.slimfit = SlimFit.from_config(self.config, plugins=self.plugins)
        self.slimfit.prepare_model(model)
        _PREPARED[model] = self.slimfit

    def _close_step(self) -> None:
        if self._step is not None:
            step, self._step = self._step, None
            step.close()


class _TrainerAccelerator:
    """What ``SlimFit.attach`` reads from an Accelerator, for the Trainer's own (callbacks are not
    given it): the distributed setup from Accelerate's shared state and, under DeepSpeed, the
    engine that wraps ``model``; under DDP the DDP wrapper (``ddp_model``: the step in backward
    takes the averaged gradients from its buckets)."""

    def __init__(self, model: nn.Module):
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        state = PartialState()
        self.distributed_type = state.distributed_type
        self.num_processes = state.num_processes
        if self.distributed_type == DistributedType.DEEPSPEED:
            self.deepspeed_engine_wrapped = SimpleNamespace(engine=_deepspeed_engine(model))
        elif self.num_processes > 1:
            self.ddp_model = _ddp_wrapper(model)

    def register_for_checkpointing(self, *objects: Any) -> None:
        """Not needed: the Trainer saves no ``accelerator.save_state``; the SlimFit state goes into
        ``trainer_state.json`` (``SlimFitCallback.state``)."""


def _deepspeed_engine(model: nn.Module) -> Any:
    # The Trainer keeps its engine as ``model_wrapped`` and passes callbacks only the module:
    # find the engine that wraps it (once, at train begin).
    from deepspeed import DeepSpeedEngine

    for obj in gc.get_objects():
        if isinstance(obj, DeepSpeedEngine) and obj.module is model:
            return obj
    raise IntegrationError("SlimFitCallback: the Trainer runs DeepSpeed but no DeepSpeed engine wraps its model")


def _ddp_wrapper(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DDP that wraps ``model`` (the Trainer keeps it as ``model_wrapped``), if any."""
    for obj in gc.get_objects():
        if isinstance(obj, nn.parallel.DistributedDataParallel) and obj.module is model:
            return obj
    return None


def _check_ddp(args: Any, model: nn.Module) -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    launched = PartialState()
    if launched.num_processes > 1 and launched.distributed_type != DistributedType.DEEPSPEED:
        if reentrant_checkpointing(model):
            kwargs_name = _args_field(args, "activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
            raise IntegrationError(
                "SlimFitCallback: activation checkpointing with use_reentrant=True does not work under DDP with "
                "SlimFit (frozen units need find_unused_parameters=True, which reentrant backward breaks). Set "
                f"TrainingArguments({kwargs_name}={{'use_reentrant': False}}, ddp_find_unused_parameters=True)."
            )
        if not _trainer_finds_unused_parameters(args, model):
            raise IntegrationError(
                "SlimFitCallback: DDP would wait for gradients of frozen units (find_unused_parameters is off, "
                "as the Trainer does with activation checkpointing). Set TrainingArguments(ddp_find_unused_parameters=True)."
            )


def _trainer_finds_unused_parameters(args: Any, model: nn.Module) -> bool:
    """The ``find_unused_parameters`` the Trainer gives DDP, as transformers 4.x and 5.x decide it.

    An explicit ``ddp_find_unused_parameters`` wins; otherwise a ``PreTrainedModel`` gets
    ``not checkpointing`` and any other model ``True``. The two versions name "checkpointing"
    differently (4.x: ``model.is_gradient_checkpointing``, ``args.gradient_checkpointing``; 5.x:
    ``is_activation_checkpointing``, ``activation_checkpointing``), so it is read from what both
    have: the ``gradient_checkpointing`` flag checkpointed modules carry, and either args field.
    """
    from transformers import PreTrainedModel

    if args.ddp_find_unused_parameters is not None:
        return bool(args.ddp_find_unused_parameters)
    if not isinstance(model, PreTrainedModel):
        return True
    model_checkpoints = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    args_checkpoint = bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None))
    return not (model_checkpoints or args_checkpoint)


def _args_field(args: Any, *names: str) -> str:
    """The first of ``names`` this transformers version's ``TrainingArguments`` has (for messages)."""
    return next((name for name in names if hasattr(args, name)), names[-1])


def _saved_state(state: Any, name: str) -> str | None:
    stored = (state.stateful_callbacks or {}).get(name)
    if isinstance(stored, list):
        stored = stored[0] if stored else None
    if not isinstance(stored, dict):
        return None
    return stored.get("attributes", {}).get("slimfit_state")


def _encode(state: dict) -> str:
    # trainer_state.json is JSON: the controller state (tensors, generator states) goes in as
    # one base64 torch.save blob, exact and small (a float per unit plus strategy state).
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode(blob: str) -> dict:
    return torch.load(io.BytesIO(base64.b64decode(blob)), weights_only=True)
