"""Kernels, usable on their own (they import nothing else of spion_fx).

- ``kernels.attention``: block layout, ``spion::block_sparse_attention`` (CPU kernels, Triton on
  CUDA), the attention probe op, HSA, float64 reference; ``attention.decode``:
  ``block_sparse_decode_attention`` (queries at the end of a KV cache) and its ``DecodeLayout``.
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

__all__ = [
    "BlockLayout",
    "DecodeLayout",
    "block_sparse_attention",
    "block_sparse_attention_bwd",
    "block_sparse_attention_fwd",
    "block_sparse_decode_attention",
    "dense_block_mask",
    "reference_attention",
]
