"""spion_fx: sparse Transformer training by compiler passes.

``spion_fx.sparsify(model, policy)`` captures any PyTorch / Hugging Face model with Dynamo,
finds its attention and linear sites, and rewrites them with runtime modules: SPION block-sparse
attention (dense training with stability probes, then a per-layer block pattern) and N:M / MST
linear sparsity. ``torch.compile(model, backend="spion")`` is the same machinery.
"""

from spion_fx.api import desparsify, get_state, report, save_patterns, sparsify
from spion_fx.policy import AttentionPolicy, LinearPolicy, Policy
from spion_fx.runtime.pattern import generate_pattern

__all__ = [
    "AttentionPolicy",
    "LinearPolicy",
    "Policy",
    "desparsify",
    "finalize",
    "generate_pattern",
    "get_state",
    "report",
    "save_patterns",
    "sparsify",
]
__version__ = "0.1.0"


def finalize(model, **kwargs):
    """Bake trained N:M / MST masks into the weights and swap in packed sparse layers."""
    from spion_fx.lowering.finalize import finalize as _finalize

    return _finalize(model, **kwargs)
