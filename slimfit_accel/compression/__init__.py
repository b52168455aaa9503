"""Activation compression: pack what autograd saves for backward, by module, role and frozen state.

Example::

    from slimfit_accel.compression import compressed_activations
    with compressed_activations(model) as engine:      # SlimFit's default policy
        loss = model(**batch).loss
    loss.backward()
"""

from .accounting import StepStats
from .engine import CompressionEngine, compressed_activations
from .policy import CompressionPolicy, CompressorSpec, Rule, slimfit_policy, slimfit_reference_policy
from .registry import installed_compressor_factories
from .roles import tag_role

__all__ = [
    "CompressionEngine",
    "CompressionPolicy",
    "CompressorSpec",
    "Rule",
    "StepStats",
    "compressed_activations",
    "installed_compressor_factories",
    "slimfit_policy",
    "slimfit_reference_policy",
    "tag_role",
]
