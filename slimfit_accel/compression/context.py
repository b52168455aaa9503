"""Which module is running: a stack kept by forward pre/post hooks on every submodule.

Each frame records the module's path, class name and kind (what it computes, ``kinds.py``), whether it is frozen *at this forward*
(none of its own weights has ``requires_grad``; biases do not count, since SlimFit never
freezes them and a bias gradient needs no saved activation; a module without parameters of its
own is frozen when no weight under it is trainable, so a GELU or Dropout counts as frozen), the
address of its first tensor input (to tell the role ``input``) and its parameters as they are
at this forward (under ZeRO-3 a gathered weight is new storage, so start-up addresses are not
enough to recognise parameters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# Autograd nodes that only view or cast their input: a saved tensor reached from a parameter's
# AccumulateGrad through these is a parameter in disguise (e.g. an autocast copy of a weight).
_PASS_THROUGH = frozenset(
    {
        "ToCopyBackward0", "TBackward0", "TransposeBackward0", "TransposeBackward1",
        "PermuteBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
        "ExpandBackward0", "AliasBackward0", "DetachBackward0", "SqueezeBackward0",
        "SqueezeBackward1", "UnsqueezeBackward0", "SliceBackward0", "SelectBackward0",
    }
)


@dataclass
class Frame:
    """One running module, as seen by the saved tensors of its own forward."""

    path: str
    type_name: str
    frozen: bool
    input_ptr: int
    param_ptrs: frozenset[int]
    param_shapes: frozenset[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=frozenset)
    kind: str = ""


_OUTSIDE = Frame(path="", type_name="", frozen=False, input_ptr=0, param_ptrs=frozenset())


def _storage_ptr(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without plain storage
        return 0


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


class _Hook:
    """One of a context's forward hooks on a module. A copy of the model (``copy.deepcopy``,
    ``torch.save``) gets an inert one: the copy is not the model the context watches, and the
    closure it calls cannot be pickled."""

    __slots__ = ("call",)

    def __init__(self, call: Any = None):
        self.call = call

    def __call__(self, *args: Any) -> None:
        if self.call is not None:
            self.call(*args)

    def __reduce__(self) -> tuple:
        return (_Hook, ())


class ModuleContext:
    """Forward hooks on every submodule of ``model`` that keep a stack of running modules.

    Example::

        context = ModuleContext(model)
        context.attach()
        ...                        # during forward, context.current() is the innermost module
        context.detach()
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._stack: list[Frame] = []
        self._handles: list[Any] = []
        self._static_ptrs: frozenset[int] = frozenset()

    def attach(self, kinds: dict[str, str] | None = None) -> None:
        """Install the hooks; ``kinds`` (``path -> kind``) labels the frames."""
        if self._handles:
            return
        kinds = kinds or {}
        self._static_ptrs = frozenset(p for p in map(_storage_ptr, self.model.parameters()) if p)
        for path, module in self.model.named_modules():
            own = tuple(module.parameters(recurse=False))
            named = module.named_parameters(recurse=False) if own else module.named_parameters()
            weights = tuple(p for name, p in named if name.rsplit(".", 1)[-1] != "bias")
            push = self._make_push(path, type(module).__name__, own, weights, kinds.get(path, ""))
            self._handles.append(module.register_forward_pre_hook(_Hook(push), with_kwargs=True))
            self._handles.append(module.register_forward_hook(_Hook(self._pop), always_call=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()

    def current(self) -> Frame:
        """The innermost running module, or an anonymous frame outside the model."""
        return self._stack[-1] if self._stack else _OUTSIDE

    @property
    def depth(self) -> int:
        return len(self._stack)

    def _make_push(self, path: str, type_name: str, own: tuple[nn.Parameter, ...], weights: tuple[nn.Parameter, ...], kind: str):
        def push(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            frozen = not any(p.requires_grad for p in weights)
            first = _first_tensor(args, kwargs)
            self._stack.append(
                Frame(
                    path=path,
                    type_name=type_name,
                    frozen=frozen,
                    input_ptr=first.data_ptr() if first is not None else 0,
                    param_ptrs=frozenset(p for p in map(_storage_ptr, own) if p),
                    param_shapes=frozenset((tuple(p.shape), p.dtype) for p in own if p.dim() >= 1),
                    kind=kind,
                )
            )

        return push

    def _pop(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        if self._stack:
            self._stack.pop()

    def is_parameter(self, tensor: torch.Tensor) -> bool:
        """True if ``tensor`` is a parameter, a view of one, or a cast copy of one.

        Checks, cheapest first: the object's type; its view base; its storage against the
        parameters at start-up and those of every running module *now* (ZeRO-3 gathers); the
        autograd chain of views/casts down to a parameter's AccumulateGrad; and, for copies of
        frozen weights (autocast casts them without a graph), a tensor without graph shaped like
        (or transposed from) a weight of a running module but of another dtype.
        """
        if isinstance(tensor, nn.Parameter):
            return True
        base = tensor._base
        if base is not None and isinstance(base, nn.Parameter):
            return True
        ptr = _storage_ptr(tensor)
        if ptr and (ptr in self._static_ptrs or any(ptr in f.param_ptrs for f in self._stack)):
            return True
        node = tensor.grad_fn if base is None else (tensor.grad_fn or base.grad_fn)
        while node is not None and type(node).__name__ in _PASS_THROUGH:
            node = node.next_functions[0][0] if node.next_functions else None
        if node is not None and type(node).__name__ == "AccumulateGrad":
            return isinstance(node.variable, nn.Parameter)
        return self._looks_like_cast_weight(tensor if base is None else base)

    def _looks_like_cast_weight(self, tensor: torch.Tensor) -> bool:
        if tensor.grad_fn is not None or tensor.dim() < 1:
            return False
        shape, dtype = tuple(tensor.shape), tensor.dtype
        for frame in self._stack:
            for weight_shape, weight_dtype in frame.param_shapes:
                if weight_dtype != dtype and (weight_shape == shape or weight_shape == shape[::-1]):
                    return True
        return False
