"""Causal-LM cross-entropy without the full logits: the head and the loss run chunk by chunk.

A causal LM's loss needs ``hidden @ lm_head.weight.T`` for every token: batch x length x vocab
logits, upcast to fp32, plus the log-softmax autograd keeps for backward (8 x 512 tokens x 49152
words is 1.6 GB for these two alone). Here the tokens go through the head and the loss ``chunk_size``
at a time: forward keeps one chunk's logits alive. When the head trains, backward recomputes each
chunk's logits and adds its share to the hidden states' and the head's gradients; only the hidden
states are saved (the head's weight is a parameter). When the head is frozen (most SlimFit steps),
forward also turns each chunk's logits into its share of the hidden states' gradient and saves
that instead (tagged ``EXACT_ROLE``: never compressed); backward only scales it, so the step runs
the head once. Results equal the standard path: the same kernels, the same
fp32 upcast, mean over non-ignored tokens, or sum / ``num_items_in_batch`` when given
(transformers' ``ForCausalLMLoss``); only the order of the sums differs.

Two ways in:

- ``chunked_linear_cross_entropy(hidden, weight, bias, labels)``: the function, for a loop of
  your own (``labels`` already aligned with ``hidden``: shift them first for a causal LM).
- ``enable_chunked_loss(model)`` (or ``chunked_loss: true`` in a SlimFit config): a Hugging Face
  causal LM computes its training loss this way. Its own ``forward`` still runs; while labels
  are given and autograd records, its head passes the hidden states through and its
  ``loss_function`` runs the chunked loss through the head (so hooks that gather the head's
  weight, such as ZeRO-3's, see the call). The output has the loss and no logits. Without labels,
  or under ``torch.no_grad()`` (evaluation), the model runs unchanged and returns its logits.
  A model that changes the head's output before its loss (logit soft-capping or scaling) or
  does not compute its loss through ``self.loss_function`` fails at its first such forward.

Backend ``liger`` (and ``auto`` on CUDA when the ``liger-kernel`` package is installed, the hidden
states and head weight share a dtype and autocast is off) uses liger-kernel's fused linear
cross-entropy instead of the chunked torch path. Liger computes the gradients during forward and
keeps them until backward; they are kept exact, outside the compression engine and its meter.
The liger path is not tested in this project's suite (no CUDA there).

Compression: the hidden states this function saves are an activation like any other. Inside
SlimFit's ``step()`` they are packed in the head's module context, role ``input``: the default
policy stores them as int8 with a scale per row, as it stores the head's input on the standard
path; ``compression: none`` keeps them exact. The gradient saved for a frozen head is kept exact
under every policy (and counted by the meter). The per-chunk logits of backward are working
memory, never compressed and not counted as saved activations.
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .compression.roles import EXACT_ROLE, tag_role
from .compression.swaps import bind_forward
from .errors import ConfigError, IntegrationError

DEFAULT_CHUNK_SIZE = 1024
Backend = Literal["auto", "torch", "liger"]


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of ``cross_entropy(float(hidden @ weight.T + bias), labels)``, a chunk of
    tokens at a time in forward and backward. Labels equal to ``ignore_index`` add nothing.
    Gradients are computed only for the inputs that need them (a frozen head gets none)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index: int, chunk_size: int):  # noqa: D102
        # A frozen head kept in int8 (frozen_int8.StoredWeight): dequantised a slice of rows at a
        # time for each chunk of tokens, here and again in backward, never saved.
        ctx.stored = None if isinstance(weight, torch.Tensor) else weight
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        # A frozen head (and bias): the hidden states' gradient is all backward needs, and it is
        # linear in the loss's gradient, so it is computed here, chunk by chunk from the logits
        # forward makes anyway, and scaled in backward: no logits are recomputed (one head matmul
        # and one softmax a step fewer than recomputing). A trained head's weight gradient would
        # be alive from here on (a vocabulary-sized matrix at the end of forward), so then
        # backward recomputes the logits instead.
        ctx.early = need_hidden and not need_weight and not need_bias
        flat = hidden.reshape(-1, hidden.shape[-1])
        targets = labels.reshape(-1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_flat = torch.empty(flat.shape, dtype=hidden.dtype, device=hidden.device) if ctx.early else None
        compute_dtype = None
        for start in range(0, flat.shape[0], chunk_size):
            logits = _head(flat[start:start + chunk_size], weight, bias)  # autocast applies here
            compute_dtype = logits.dtype
            chunk_targets = targets[start:start + chunk_size]
            if not ctx.early:
                total += F.cross_entropy(logits.float(), chunk_targets, ignore_index=ignore_index, reduction="sum")
                del logits
                continue
            loss, grad_logits = _loss_and_grad_logits(logits, chunk_targets, ignore_index)
            del logits
            total += loss
            with torch.autocast(hidden.device.type, enabled=False):
                grad_flat[start:start + chunk_size] = _grad_hidden(grad_logits, weight, compute_dtype)
            del grad_logits
        if ctx.early:
            # The gradient of the summed loss: kept exact by the compression engine, and counted.
            grad_hidden = grad_flat.view(hidden.shape)
            tag_role(grad_hidden, EXACT_ROLE)
            ctx.save_for_backward(grad_hidden)
        else:
            ctx.save_for_backward(hidden, weight if ctx.stored is None else None, bias, labels)
        ctx.compute_dtype = compute_dtype or hidden.dtype
        ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):  # noqa: D102
        if ctx.early:  # a frozen head: the gradient computed in forward, times the loss's gradient
            (grad_hidden,) = ctx.saved_tensors
            return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None
        hidden, weight, bias, labels = ctx.saved_tensors
        if ctx.stored is not None:  # a frozen int8 head: no weight gradient, the input's in row slices
            grad_hidden, grad_bias = _stored_head_backward(ctx, hidden, bias, labels, grad_total)
            return grad_hidden, None, grad_bias, None, None, None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype, size = ctx.compute_dtype, ctx.chunk_size
        flat = hidden.reshape(-1, hidden.shape[-1])
        targets = labels.reshape(-1)
        # The head as forward ran it: autocast's casts made explicit, autocast itself off here.
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_flat = grad_hidden.view(-1, hidden.shape[-1]) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        # Autocast off: its casts are explicit above. No graph is built here, so nothing is saved.
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, flat.shape[0], size):
                h = flat[start:start + size].to(dtype)
                grad_logits = _grad_logits(F.linear(h, w, b), targets[start:start + size], ctx.ignore_index, grad_total)
                if need_hidden:
                    grad_flat[start:start + size] = grad_logits @ w
                if need_weight:
                    if grad_weight.dtype == dtype:
                        grad_weight.addmm_(grad_logits.t(), h)
                    else:
                        grad_weight += grad_logits.t() @ h
                if need_bias:
                    grad_bias += grad_logits.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _head(h: torch.Tensor, weight, bias: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.linear(h, weight, bias)``; a frozen int8 head (``StoredWeight``) is dequantised a slice
    of rows at a time (cast to ``dtype`` when given: backward's explicit autocast) and its logits
    written into one buffer (one ``F.linear`` when a slice is the whole head)."""
    if isinstance(weight, torch.Tensor):
        return F.linear(h, weight, bias)
    vocab, out = weight.codes.shape[0], None
    for start, rows in weight.row_slices():
        stop = start + rows.shape[0]
        part = F.linear(h, rows if dtype is None else rows.to(dtype), None if bias is None else bias[start:stop])
        if out is None and stop == vocab:
            return part
        if out is None:
            out = torch.empty(part.shape[:-1] + (vocab,), dtype=part.dtype, device=part.device)
        out[..., start:stop] = part
        del part, rows
    return out


def _grad_hidden(grad_logits: torch.Tensor, weight, dtype: torch.dtype) -> torch.Tensor:
    """``grad_logits @ weight`` with the head's weight cast to ``dtype`` (autocast's cast, made
    explicit); a frozen int8 head a slice of rows at a time, the partial products summed in fp32."""
    if isinstance(weight, torch.Tensor):
        return grad_logits @ weight.to(dtype)
    acc = None
    for first, rows in weight.row_slices():
        part = grad_logits[:, first:first + rows.shape[0]] @ rows.to(dtype)
        acc = part if acc is None else (acc.float() if acc.dtype != torch.float32 else acc).add_(part)
        del part, rows
    return acc


def _loss_and_grad_logits(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed cross-entropy of one chunk (fp32, as ``F.cross_entropy(logits.float())``) and
    its gradient (softmax - one-hot, zero on ignored tokens) in the logits' dtype, from one
    log-sum-exp: the chunk's fp32 logits are turned into the gradient in place."""
    dtype = logits.dtype
    x = logits.float()
    if x is logits:
        x = x.clone()  # the caller's logits stay as they were
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    valid = targets != ignore_index
    rows = valid.nonzero().squeeze(1)
    cols = targets[rows]
    loss = (lse[rows, 0] - x[rows, cols]).sum()
    grad = x.sub_(lse).exp_()
    grad[rows, cols] -= 1.0
    grad[~valid] = 0.0  # ignored tokens: only their rows are written, not a pass over the chunk
    return loss, grad.to(dtype)


def _stored_head_backward(ctx, hidden, bias, labels, grad_total):
    """Gradients (hidden states, bias) through a frozen int8 head (``ctx.stored``, no weight
    gradient): for each chunk of tokens, its logits and ``grad_logits @ weight`` computed a slice
    of the head's rows at a time, autocast's casts explicit."""
    need_hidden, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dtype, size, stored = ctx.compute_dtype, ctx.chunk_size, ctx.stored
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = labels.reshape(-1)
    b = bias.to(dtype) if bias is not None else None
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
    grad_bias = torch.zeros_like(bias) if need_bias else None
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, flat.shape[0], size):
            h = flat[start:start + size].to(dtype)
            grad_logits = _grad_logits(_head(h, stored, b, dtype), targets[start:start + size], ctx.ignore_index, grad_total)
            if need_hidden:
                grad_hidden.view(-1, hidden.shape[-1])[start:start + size] = _grad_hidden(grad_logits, stored, dtype)
            if need_bias:
                grad_bias += grad_logits.sum(0)
    return grad_hidden, grad_bias


def _grad_logits(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, scale: torch.Tensor) -> torch.Tensor:
    """d(sum of cross-entropy)/d(logits) times ``scale``: (softmax - one-hot), zero on ignored
    tokens, computed in fp32 in place (two chunk-sized tensors alive, not the five autograd's
    log-softmax backward makes) and cast back to the logits' dtype as ``.float()``'s backward does."""
    dtype = logits.dtype
    grad = torch.softmax(logits.float(), dim=-1)
    del logits
    valid = targets != ignore_index
    rows = valid.nonzero().squeeze(1)
    grad[rows, targets[rows]] -= 1.0
    grad.mul_(valid.unsqueeze(1).to(grad.dtype) * scale)
    return grad.to(dtype)


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: Backend = "torch",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, one chunk of tokens at a
    time: ``chunk_size x vocab`` fp32 logits at most are alive. ``labels`` has one entry per
    token of ``hidden`` (already shifted for a causal LM). The loss is the mean over tokens whose
    label is not ``ignore_index`` or, with ``num_items_in_batch``, their sum divided by it
    (gradient accumulation), as in transformers' ``fixed_cross_entropy``.

    Example::

        hidden = model.model(input_ids).last_hidden_state[:, :-1]
        loss = chunked_linear_cross_entropy(hidden, model.lm_head.weight, None, input_ids[:, 1:])
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    targets = labels.reshape(-1).to(hidden.device)
    tokens = hidden.numel() // hidden.shape[-1] if hidden.shape[-1] else 0
    if targets.numel() != tokens:
        raise ValueError(f"Expected input batch_size ({tokens}) to match target batch_size ({targets.numel()}).")
    frozen_int8 = not isinstance(weight, torch.Tensor)  # a frozen head in int8: the chunked torch path dequantises it
    if not frozen_int8 and (backend == "liger" or (backend == "auto" and _liger_applies(hidden, weight))):
        total = _liger_sum(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets, ignore_index)
    else:
        total = ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, chunk_size)
    if num_items_in_batch is None:
        return total / (targets != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# ---------------------------------------------------------------- liger-kernel (CUDA only)
def liger_available() -> bool:
    """Whether liger-kernel's fused linear cross-entropy can be imported."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except ImportError:
        return False
    return True


def _liger_applies(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        hidden.is_cuda
        and hidden.dtype == weight.dtype
        and not torch.is_autocast_enabled(hidden.device.type)
        and liger_available()
    )


def _liger_sum(hidden, weight, bias, targets, ignore_index):  # pragma: no cover - needs CUDA
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    # Liger saves the gradients it computes in forward: an engine must not pack them lossily.
    with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
        out = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")(weight, hidden.contiguous(), targets, bias)
    return (out[0] if isinstance(out, tuple) else out).float()


# ---------------------------------------------------------------- Hugging Face causal LMs
class _ChunkedLossState:
    """Settings, and what one forward passes from the head to the loss, shared by a model and its
    head (a copy of the model shares its own copy)."""

    def __init__(self, chunk_size: int, backend: Backend):
        self.chunk_size, self.backend = chunk_size, backend
        self.passthrough = False  # this forward: the head returns its input
        self.pending: torch.Tensor | None = None  # what the head passed through
        self.loss_args: dict[str, Any] | None = None  # set while the loss calls the head
        self.used = False


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside ``model`` (PEFT's wrapper unwrapped)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


#: Config attributes with which transformers' causal LMs change the head's output before the loss
#: (Gemma 2/3's soft-capping, Cohere's and Granite's scaling), and the values that change nothing.
LOGIT_TRANSFORMS = {"final_logit_softcapping": (None,), "logit_scale": (None, 1, 1.0), "logits_scaling": (None, 1, 1.0)}


def unsupported(model: nn.Module) -> str | None:
    """Why the chunked loss cannot run on ``model``, in one phrase; ``None`` when it can: a causal
    LM with a plain ``nn.Linear`` head, transformers' causal-LM loss, no transform of the logits
    before the loss (``LOGIT_TRANSFORMS``) and no forward patched on the instance by another
    library. (A transform that no config attribute announces is caught at the first forward.)"""
    from transformers.loss.loss_utils import ForCausalLMLoss

    lm = causal_lm(model)
    name = type(lm).__name__
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return f"{name} has no output embeddings (get_output_embeddings() is None), so it is not a causal LM"
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return f"{name}'s head is a {type(head).__name__}, not a plain nn.Linear (e.g. an adapter on the head)"
    if "_loss_function" in lm.__dict__ or getattr(lm, "loss_function", None) is not ForCausalLMLoss:
        return (f"{name} does not use transformers' causal-LM loss (loss_type {getattr(lm, 'loss_type', None)!r}, "
                f"or a custom loss_function); the chunked loss computes only that one")
    config = getattr(lm, "config", None)
    for attribute, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(config, attribute, None)
        if value not in neutral:
            return (f"{name} changes its head's output before the loss ({attribute}={value!r}: logit soft-capping or "
                    f"scaling), which the chunked loss does not compute")
    if getattr(lm, "_slimfit_chunked_loss", None) is None:
        for module, what in ((lm, name), (head, f"{name}'s head")):
            if "forward" in module.__dict__:
                return f"{what} already has a forward patched on the instance (by another library, e.g. offloading hooks)"
    return None


def enable_chunked_loss(model: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE, backend: Backend = "auto") -> nn.Module:
    """Make a Hugging Face causal LM compute its training loss chunk by chunk (module docstring).

    Patches ``forward`` on the model instance and on its head (``get_output_embeddings()``, an
    ``nn.Linear``; a head tied to the input embeddings is that weight); other instances of the
    class are untouched, a ``copy.deepcopy`` runs its own weights. Calling it again updates the
    settings. Raises ``ConfigError`` (one line) for a model it does not cover (``unsupported``
    says why). ``disable_chunked_loss`` undoes it.

    Example::

        model = enable_chunked_loss(AutoModelForCausalLM.from_pretrained(...), chunk_size=2048)
        loss = model(input_ids=ids, labels=ids).loss      # .logits is None
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ConfigError(f"chunked_loss: chunk_size must be a positive number of tokens, got {chunk_size!r}")
    if backend not in ("auto", "torch", "liger"):
        raise ConfigError(f"chunked_loss: backend must be auto, torch or liger, got {backend!r}")
    if backend == "liger" and not liger_available():
        raise ConfigError("chunked_loss: backend liger needs the liger-kernel package (pip install liger-kernel) and CUDA; use backend auto or torch")
    reason = unsupported(model)
    if reason is not None:
        raise ConfigError(f"chunked_loss: {reason}; remove chunked_loss from the config, or set it to auto "
                          f"(this model then computes its loss the standard way)")
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    state = getattr(lm, "_slimfit_chunked_loss", None)
    if state is not None:
        state.chunk_size, state.backend = chunk_size, backend
        return model
    state = _ChunkedLossState(chunk_size, backend)
    lm._slimfit_chunked_loss = state
    head._slimfit_chunked_loss = state
    lm.forward = bind_forward(lm, _forward_with_chunked_loss)
    head.forward = bind_forward(head, _head_forward)
    return model


def disable_chunked_loss(model: nn.Module) -> None:
    """Undo ``enable_chunked_loss`` on this model (copies keep theirs). No-op if not enabled."""
    lm = causal_lm(model)
    if getattr(lm, "_slimfit_chunked_loss", None) is None:
        return
    for module in (lm, *lm.modules()):
        if module.__dict__.pop("_slimfit_chunked_loss", None) is not None:
            module.__dict__.pop("forward", None)


def chunked_loss_enabled(model: nn.Module) -> bool:
    """Whether ``enable_chunked_loss`` is in effect on ``model``."""
    return getattr(causal_lm(model), "_slimfit_chunked_loss", None) is not None


def _labels(forward: Any, args: tuple, kwargs: dict) -> Any:
    if "labels" in kwargs:
        return kwargs["labels"]
    names = [p for p in inspect.signature(forward).parameters][1:]  # after self
    index = names.index("labels") if "labels" in names else len(args)
    return args[index] if index < len(args) else None


def _forward_with_chunked_loss(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(model).forward
    if not torch.is_grad_enabled() or _labels(forward, args, kwargs) is None:
        return forward(model, *args, **kwargs)
    state: _ChunkedLossState = model._slimfit_chunked_loss
    state.passthrough, state.used, state.pending = True, False, None
    model._loss_function = partial(_chunked_causal_lm_loss, model)
    try:
        output = forward(model, *args, **kwargs)
    finally:
        state.passthrough, state.pending, state.loss_args = False, None, None
        model.__dict__.pop("_loss_function", None)
    if not state.used:
        raise IntegrationError(
            f"chunked_loss: {type(model).__name__} did not compute its loss through self.loss_function, so the chunked "
            f"loss cannot replace it; remove chunked_loss from the config for this model"
        )
    return _without_logits(output)


def _head_forward(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    state: _ChunkedLossState = head._slimfit_chunked_loss
    from .frozen_int8 import head_weight, linear_forward  # frozen_weights: int8 keeps a frozen head in int8

    if state.loss_args is not None:  # called by the loss: run it inside the head's own hooks
        return chunked_linear_cross_entropy(hidden, head_weight(head.weight), head.bias, **state.loss_args)
    if state.passthrough:  # the model's forward: the logits are made later, a chunk at a time
        state.pending = hidden
        return hidden
    return linear_forward(head, hidden)


def _chunked_causal_lm_loss(
    model: nn.Module,
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on the hidden states the head passed through."""
    state: _ChunkedLossState = model._slimfit_chunked_loss
    name = type(model).__name__
    if state.pending is None or logits is not state.pending:
        raise IntegrationError(
            f"chunked_loss: {name} changes its head's output before the loss (e.g. logit soft-capping or scaling), which "
            f"the chunked loss does not compute; remove chunked_loss from the config for this model"
        )
    head = model.get_output_embeddings()
    if vocab_size != head.out_features:
        raise IntegrationError(f"chunked_loss: {name} asks for a loss over {vocab_size} words but its head has {head.out_features}")
    if shift_labels is None:  # tokens < n predict n
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    state.used, state.pending = True, None
    state.loss_args = {
        "labels": shift_labels, "num_items_in_batch": num_items_in_batch, "ignore_index": ignore_index,
        "chunk_size": state.chunk_size, "backend": state.backend,
    }
    try:
        return head(logits)
    finally:
        state.loss_args = None


def _without_logits(output: Any) -> Any:
    """The model's output with the hidden states the head passed through removed from ``logits``."""
    if isinstance(output, tuple):
        return output[:1] + output[2:]
    items = {key: value for key, value in output.items() if key != "logits"}
    return type(output)(**items)
