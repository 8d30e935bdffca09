"""Kernels, usable on their own (they import nothing else of spion_fx).

- ``kernels.attention``: block layout, ``spion::block_sparse_attention`` (CPU kernels, Triton on
  CUDA), the attention probe op, HSA, float64 reference; ``attention.decode``:
  ``block_sparse_decode_attention`` (queries at the end of a KV cache) and its ``DecodeLayout``.
- ``attention.routing``: ``routed_layout``, a per-input (batched) layout chosen on the device
  from pooled queries and keys (MoBA's top-k key blocks + diagonal + sinks).
- ``kernels.nm``: packed N:M weights and their matmuls (CPU, Triton).

The attention op's public names are re-exported here.
"""

from .attention import (
    BlockLayout,
    block_sparse_attention,
    block_sparse_attention_bwd,
    block_sparse_attention_fwd,
    dense_block_mask,
    reference_attention,
)
from .attention.decode import DecodeLayout, block_sparse_decode_attention
from .attention.routing import routed_layout

__all__ = [
    "BlockLayout",
    "DecodeLayout",
    "block_sparse_attention",
    "block_sparse_attention_bwd",
    "block_sparse_attention_fwd",
    "block_sparse_decode_attention",
    "dense_block_mask",
    "reference_attention",
    "routed_layout",
]
