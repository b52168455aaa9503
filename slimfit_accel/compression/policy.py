"""Which compressor stores which saved tensor: an ordered list of rules, first match wins.

A rule matches on the module that saved the tensor (what it computes, its class-name glob,
path globs), the tensor's role where the engine can tell it, and whether that module is frozen
this step. YAML::

    compression:
      rules:
        - {module_kind: activation, compressor: {name: int4}}
        - {role: normalized, when: frozen, compressor: {name: int4}}
      default: {name: none}

:func:`slimfit_policy` is the default, after SlimFit's activation table (../shared/SLIMFIT.md)
with scaled formats; :func:`slimfit_reference_policy` uses the reference's fixed-point formats.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..hookspecs import SavedTensorContext
from ..spec import StrategySpec


#: A compressor by plugin name plus its options, e.g. ``{name: int8, group_size: 64}``.
CompressorSpec = StrategySpec


class Rule(BaseModel):
    """One line of the policy. Unset matchers match anything; all set ones must match.

    ``module_kind`` is what the innermost running module computes (``activation``, ``relu``,
    ``norm``, ``mlp``, ``ffn_down``, ``lm``: see ``compression/kinds.py``); ``module_type`` and ``role``
    are globs on its class name and on the role (``input``, ``normalized``, ``rstd``; tensors of
    unknown role only match an unset ``role``); ``path`` are globs on the module path (``*`` also
    crosses dots); a path matching any ``exclude`` glob vetoes the rule; ``ndim``: the saved
    tensor's number of dimensions.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    module_kind: Literal["activation", "relu", "norm", "mlp", "ffn_down", "lm"] | None = None
    module_type: str | None = None
    path: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    role: str | None = None
    ndim: int | None = Field(default=None, ge=0)
    when: Literal["frozen", "trainable", "any"] = "any"
    compressor: CompressorSpec

    @field_validator("path", "exclude", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    def matches(self, ctx: SavedTensorContext) -> bool:
        if self.when != "any" and (self.when == "frozen") != ctx.frozen:
            return False
        if self.module_kind is not None and self.module_kind != ctx.module_kind:
            return False
        if self.ndim is not None and len(ctx.shape) != self.ndim:
            return False
        if self.module_type is not None and not fnmatchcase(ctx.module_type, self.module_type):
            return False
        if self.role is not None and (ctx.role is None or not fnmatchcase(ctx.role, self.role)):
            return False
        if self.path and not any(fnmatchcase(ctx.module_path, p) for p in self.path):
            return False
        return not any(fnmatchcase(ctx.module_path, p) for p in self.exclude)


class CompressionPolicy(BaseModel):
    """Ordered rules (first match wins) and the compressor for everything unmatched.

    Floating-point tensors with fewer than ``min_numel`` elements are kept as they are (the
    packing overhead would outweigh the saving), and so are tensors of fewer than ``min_ndim``
    dimensions: a 1-D saved tensor is a statistic per token or row (a loss's log-normaliser,
    TRL's fused LM head saves two), small next to the activations, and a per-row format would
    give the whole vector one scale (the log-normaliser then shifts every probability of a
    token: a biased gradient). Parameters are never compressed, whatever the rules say.

    Example::

        policy = CompressionPolicy.model_validate(yaml.safe_load(text)["compression"])
        spec = policy.select(ctx)          # -> CompressorSpec
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: tuple[Rule, ...] = ()
    default: CompressorSpec = CompressorSpec(name="none")
    min_numel: int = Field(default=64, ge=0)
    min_ndim: int = Field(default=2, ge=0)

    def select(self, ctx: SavedTensorContext) -> CompressorSpec:
        """The compressor spec for a saved tensor in context ``ctx``."""
        for rule in self.rules:
            if rule.matches(ctx):
                return rule.compressor
        return self.default


#: Globs for the FFN down-projection (its input is the 4x-wide activation) in common models,
#: for those whose MLP is split over two modules so ``module_kind: ffn_down`` cannot tell it:
#: BERT/ViT ``layer.N.output.dense``, GPT-2 ``mlp.c_proj``, Llama-likes ``mlp.down_proj``, OPT/
#: CLIP-likes ``fc2``, GPT-NeoX ``dense_4h_to_h``, T5 ``DenseReluDense.wo``. The attention
#: output projection (``attention.output.dense``) is excluded.
FFN_DOWN_PATHS = ("*.output.dense", "*.mlp.c_proj", "*.mlp.down_proj", "*.fc2", "*.mlp.dense_4h_to_h", "*.DenseReluDense.wo")
ATTENTION_TYPES = "*Attention"
GELU_TYPES = "*GELU*"
DROPOUT_TYPES = "*Dropout*"


def _policy(gelu: dict, attention: dict, layernorm: dict, ffn_down: dict, modern: bool = True) -> CompressionPolicy:
    rules = [
        # The input a checkpointed block keeps for its recomputation (checkpointing.py).
        Rule(role="block_input", compressor=CompressorSpec(**ffn_down)),
        # Dropout masks (float 0 or 1/(1-p) on CPU) are stored exactly, one bit an element.
        Rule(module_type=DROPOUT_TYPES, compressor=CompressorSpec(name="bitmask")),
        Rule(module_type=GELU_TYPES, compressor=CompressorSpec(**gelu)),
    ]
    if modern:
        rules += [
            # A norm's 1/rms (or 1/std): one value a row, where a per-row format would store a
            # scale per element (5 bytes for 4) and cost a pack call: kept as it is.
            Rule(role="rstd", compressor=CompressorSpec(name="none")),
            # ReLU backward reads only the sign of what it saved: one bit an element, exact.
            Rule(module_kind="relu", compressor=CompressorSpec(name="bitmask", sign=True)),
            # SiLU/SwiGLU, Tanh, Mish, ... inputs (or outputs) as GELU's.
            Rule(module_kind="activation", compressor=CompressorSpec(**gelu)),
        ]
    rules += [
        Rule(module_type=ATTENTION_TYPES, compressor=CompressorSpec(**attention)),
        Rule(role="normalized", when="frozen", compressor=CompressorSpec(**layernorm))
        if modern else Rule(module_type="*LayerNorm", role="normalized", when="frozen", compressor=CompressorSpec(**layernorm)),
    ]
    if modern:
        # A loss's log-softmax output (batch x length x vocabulary): log-probabilities in 8 bits,
        # evenly spaced over each row's range (unbiased: the tail's mass is kept; int8.py).
        rules.append(Rule(role="log_probs", compressor=CompressorSpec(name="int8", log_domain=True)))
        # Anything else a language model saves itself as a matrix is the input of a fused LM-head
        # loss (TRL's SFTTrainer: tokens x hidden), from which backward recomputes every logit: int8
        # there biased the whole gradient (SmolLM2 SFT held-out loss 3.323 vs 3.305 kept exact).
        rules.append(Rule(module_kind="lm", ndim=2, compressor=CompressorSpec(name="none")))
        # A gated MLP's own glue: the operands of act(gate) * up (gated_mlp.py). ``up`` is read
        # only by the gate's gradient: as an activation's input; ``gate`` (both gradients) and
        # anything else the MLP saves as the FFN input.
        rules.append(Rule(module_kind="mlp", role="gated_up", compressor=CompressorSpec(**gelu)))
        rules.append(Rule(module_kind="mlp", compressor=CompressorSpec(**ffn_down)))
        rules.append(Rule(module_kind="ffn_down", compressor=CompressorSpec(**ffn_down)))
    rules.append(Rule(path=FFN_DOWN_PATHS, exclude=("*attention*", "*attn*"), compressor=CompressorSpec(**ffn_down)))
    # Everything else (chiefly the inputs of the layers trained this step) as the FFN input.
    default = CompressorSpec(**ffn_down) if modern else CompressorSpec(name="none")
    return CompressionPolicy(rules=tuple(rules), default=default)


def slimfit_policy() -> CompressionPolicy:
    """The default: SlimFit's table with scaled formats, extended to today's architectures.

    ==========================================  ==========  =================================
    saved tensor                                when        compressor
    ==========================================  ==========  =================================
    checkpointed block's input (role            any         int8, one scale per row
    ``block_input``, ``checkpointing:``)
    dropout mask (``*Dropout*`` modules)        any         bitmask (exact, 1 bit an element)
    GELU input (``*GELU*`` modules)             any         int4, one scale per row
    ReLU / LeakyReLU output (kind ``relu``)     any         bitmask of the sign (exact)
    other activations' inputs (SiLU, Tanh, ..)  any         int4, one scale per row
    attention operands (``*Attention``; also    any         int8, one scale per row (its
    rotary embeddings applied inside)                       dropout mask: bitmask)
    LayerNorm/RMSNorm normalized output         frozen      int4, one scale per row
    LayerNorm/RMSNorm 1/rms (role ``rstd``)     any         kept (one value a row)
    gated MLP's ``up`` of ``act(gate) * up``    any         int4, one scale per row
    (kind ``mlp``, role ``gated_up``)
    gated MLP's ``gate`` (kind ``mlp``)         any         int8, one scale per row
    FFN down-projection input                   any         int8, one scale per row
    log-softmax output of a loss (role          any         uint8 log-probabilities, a scale
    ``log_probs``; batch x length x vocab)                  and offset per row (the tail kept)
    other matrices a language model saves       any         kept (a fused LM-head loss's input:
    itself (kind ``lm``, 2-D)                               backward recomputes the logits)
    everything else (trained layers' inputs)    any         int8, one scale per row
    ==========================================  ==========  =================================

    SlimFit kept everything else, chiefly the inputs of the layers trained in the step, exact;
    int8 with a scale per row leaves the trained units' gradients as close (worst per-unit
    cosine unchanged to four decimals on tiny BERT, GPT-2, Llama, T5, ViT) and stores Llama's
    activations 4.2x smaller instead of 3.4x, ViT's 4.6x instead of 3.4x.

    The normalized output of a frozen norm was SlimFit's top-10% pruning; int4 with a scale per
    row is both smaller and closer: on a tiny ViT (pre-LayerNorm) the top-10% rule dropped the
    worst per-unit gradient cosine to 0.88, int4 keeps it at 0.998 (BERT 0.973 -> 0.996).
    """
    return _policy(
        gelu={"name": "int4"},
        # attention also saves its dropout mask: exact bits for it, int8 for the operands
        attention={"name": "bitmask", "fallback": "int8"},
        layernorm={"name": "int4"},
        ffn_down={"name": "int8"},
    )


def slimfit_reference_policy() -> CompressionPolicy:
    """SlimFit's table with the reference's fixed-point formats, for parity checks."""
    return _policy(
        gelu={"name": "fixed_point", "bits": 4, "step": 0.5},
        attention={"name": "slimfit_attention"},
        layernorm={"name": "topk", "keep": 0.1},
        ffn_down={"name": "fixed_point", "bits": 8, "step": 1 / 16},
        modern=False,
    )
