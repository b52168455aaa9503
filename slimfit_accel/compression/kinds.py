"""What a module computes, told from its class family, parameters and children, not its name.

Policy rules can match on these kinds (``module_kind``) so that a new architecture whose
classes are called something else is still covered:

- ``relu``: ``nn.ReLU`` / ``nn.LeakyReLU``; backward reads only the sign of what they save.
- ``activation``: any other parameterless elementwise nonlinearity (torch's and transformers'
  activation modules: GELU, SiLU/Swish, Tanh, Mish, ...).
- ``norm``: a normalisation layer whose saved tensors carry roles (``nn.LayerNorm`` and the
  RMSNorms the engine swaps, see ``norms.py``).
- ``mlp``: a feed-forward container: a direct child is an activation, at least two direct
  children are projections (weights with two dimensions). Tensors it saves itself are its
  functional glue, e.g. the two operands of a gated MLP's ``act(gate) * up``.
- ``ffn_down``: the last projection child of an ``mlp`` (its input is the wide activation:
  ``down_proj``, ``c_proj``, ``fc2``, ``dense_4h_to_h``, T5's ``wo``).
- ``lm``: a language model with an output head (``get_output_embeddings()`` is a module).
  Tensors it saves itself, outside its children, are its loss's: the log-probabilities of
  the standard cross-entropy, or the hidden states a fused LM-head loss (TRL's) recomputes its
  logits from in backward.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from .probe import full_shape

_NOT_ELEMENTWISE = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.MultiheadAttention, nn.Softmax2d)
_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations")
_ACTIVATION_NAMES = ("*GELU*", "*SiLU*", "*Swish*", "*Mish*", "*Activation")


def _is_projection(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and len(full_shape(weight)) == 2 and not isinstance(module, nn.Embedding)


def _has_output_head(module: nn.Module) -> bool:
    get = getattr(module, "get_output_embeddings", None)
    if not callable(get):
        return False
    try:
        return isinstance(get(), nn.Module)
    except (AttributeError, NotImplementedError, TypeError):  # a model class without a head to give
        return False


def _activation_kind(module: nn.Module) -> str:
    if isinstance(module, (nn.ReLU, nn.LeakyReLU)):
        return "relu"
    if isinstance(module, _NOT_ELEMENTWISE) or any(True for _ in module.parameters()) or any(True for _ in module.children()):
        return ""
    cls = type(module)
    if cls.__module__ in _ACTIVATION_MODULES or any(fnmatchcase(cls.__name__, p) for p in _ACTIVATION_NAMES):
        return "activation"
    return ""


def module_kinds(model: nn.Module, norms: frozenset[int] = frozenset()) -> dict[str, str]:
    """``path -> kind`` for the modules of ``model`` that have one.

    ``norms``: ids of modules known to be normalisation layers (the engine's swapped ones);
    every ``nn.LayerNorm`` counts as one too.
    """
    kinds: dict[str, str] = {}
    for path, module in model.named_modules():
        kind = _activation_kind(module)
        if not kind and (id(module) in norms or isinstance(module, nn.LayerNorm)):
            kind = "norm"
        if not kind and _has_output_head(module):
            kind = "lm"
        if kind:
            kinds[path] = kind
    for path, module in model.named_modules():
        children = list(module.named_children())
        if not any(_activation_kind(child) for _, child in children):
            continue
        projections = [name for name, child in children if _is_projection(child)]
        if len(projections) >= 2:
            kinds[path] = "mlp"
            kinds[f"{path}.{projections[-1]}" if path else projections[-1]] = "ffn_down"
    return kinds
