"""Block-sparse attention: the block layout, the ``spion::block_sparse_attention`` op with its
CPU kernels (native C++, grouped fallback) and Triton CUDA kernel, the probe op, HSA, and the
float64 reference every kernel is tested against."""

from .block_sparse_op import (
    block_sparse_attention,
    block_sparse_attention_bwd,
    block_sparse_attention_fwd,
)
from .layout import BlockLayout
from .reference import dense_block_mask, reference_attention

__all__ = [
    "BlockLayout",
    "block_sparse_attention",
    "block_sparse_attention_bwd",
    "block_sparse_attention_fwd",
    "dense_block_mask",
    "reference_attention",
]


def _register_gpu_kernels() -> None:
    """On a CUDA machine the op's CUDA implementation is the fused Triton kernel."""
    import torch

    if torch.cuda.is_available():
        from .triton_registration import register_cuda_kernels

        register_cuda_kernels()


_register_gpu_kernels()
