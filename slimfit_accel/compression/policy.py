"""Which compressor stores which saved tensor: an ordered list of rules, first match wins.

A rule matches on the module that saved the tensor (class-name glob, path globs), the tensor's
role where the engine can tell it, and whether that module is frozen this step. YAML::

    compression:
      rules:
        - {module_type: "*GELU*", compressor: {name: int4}}
        - {module_type: "*LayerNorm", role: normalized, when: frozen,
           compressor: {name: topk, keep: 0.1}}
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

    ``module_type`` and ``role`` are globs on the class name of the innermost running module and
    on the role (``input``, ``normalized``, ``rstd``; tensors of unknown role only match an unset
    ``role``); ``path`` are globs on the module path (``*`` also crosses dots); a path matching
    any ``exclude`` glob vetoes the rule.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    module_type: str | None = None
    path: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    role: str | None = None
    when: Literal["frozen", "trainable", "any"] = "any"
    compressor: CompressorSpec

    @field_validator("path", "exclude", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    def matches(self, ctx: SavedTensorContext) -> bool:
        if self.when != "any" and (self.when == "frozen") != ctx.frozen:
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
    packing overhead would outweigh the saving). Parameters are never compressed, whatever the
    rules say.

    Example::

        policy = CompressionPolicy.model_validate(yaml.safe_load(text)["compression"])
        spec = policy.select(ctx)          # -> CompressorSpec
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: tuple[Rule, ...] = ()
    default: CompressorSpec = CompressorSpec(name="none")
    min_numel: int = Field(default=64, ge=0)

    def select(self, ctx: SavedTensorContext) -> CompressorSpec:
        """The compressor spec for a saved tensor in context ``ctx``."""
        for rule in self.rules:
            if rule.matches(ctx):
                return rule.compressor
        return self.default


#: Globs for the FFN down-projection (its input is the 4x-wide GELU output) in common models:
#: BERT/ViT ``layer.N.output.dense``, GPT-2 ``mlp.c_proj``, Llama-likes ``mlp.down_proj``, OPT/
#: CLIP-likes ``fc2``. The attention output projection (``attention.output.dense``) is excluded.
FFN_DOWN_PATHS = ("*.output.dense", "*.mlp.c_proj", "*.mlp.down_proj", "*.fc2", "*.mlp.dense_4h_to_h")
ATTENTION_TYPES = "*Attention"
GELU_TYPES = "*GELU*"
DROPOUT_TYPES = "*Dropout*"


def _policy(gelu: dict, attention: dict, layernorm: dict, ffn_down: dict) -> CompressionPolicy:
    return CompressionPolicy(
        rules=(
            # Dropout masks (float 0 or 1/(1-p) on CPU) are stored exactly, one bit an element.
            Rule(module_type=DROPOUT_TYPES, compressor=CompressorSpec(name="bitmask")),
            Rule(module_type=GELU_TYPES, compressor=CompressorSpec(**gelu)),
            Rule(module_type=ATTENTION_TYPES, compressor=CompressorSpec(**attention)),
            Rule(module_type="*LayerNorm", role="normalized", when="frozen", compressor=CompressorSpec(**layernorm)),
            Rule(path=FFN_DOWN_PATHS, exclude=("*attention*", "*attn*"), compressor=CompressorSpec(**ffn_down)),
        )
    )


def slimfit_policy() -> CompressionPolicy:
    """The default: SlimFit's table with scaled formats (no saturation on large activations).

    ======================================  ==========  ==================================
    saved tensor                            when        compressor
    ======================================  ==========  ==================================
    dropout mask (``*Dropout*`` modules)    any         bitmask (exact, 1 bit an element)
    GELU input (``*GELU*`` modules)         any         int4, one scale per row
    attention operands (``*Attention``)     any         int8, one scale per row (its dropout
                                                        mask: bitmask)
    LayerNorm normalized output             frozen      topk, keep 10%
    FFN down-projection input               any         int8, one scale per row
    everything else                         any         none
    ======================================  ==========  ==================================
    """
    return _policy(
        gelu={"name": "int4"},
        # attention also saves its dropout mask: exact bits for it, int8 for the operands
        attention={"name": "bitmask", "fallback": "int8"},
        layernorm={"name": "topk", "keep": 0.1},
        ffn_down={"name": "int8"},
    )


def slimfit_reference_policy() -> CompressionPolicy:
    """SlimFit's table with the reference's fixed-point formats, for parity checks."""
    return _policy(
        gelu={"name": "fixed_point", "bits": 4, "step": 0.5},
        attention={"name": "slimfit_attention"},
        layernorm={"name": "topk", "keep": 0.1},
        ffn_down={"name": "fixed_point", "bits": 8, "step": 1 / 16},
    )
