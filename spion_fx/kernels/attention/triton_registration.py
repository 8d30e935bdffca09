"""Registers the Triton kernels as the CUDA implementation of the spion attention ops.

The ops themselves (schema, CPU kernel, fake/meta kernel, autograd) are defined in
``spion_fx.kernels.attention.block_sparse_op``; this module only adds the "cuda" dispatch key. It is safe
to call any number of times, and safe to call before that module exists (returns False).
"""

from __future__ import annotations

import importlib
import threading

import torch

_FWD_OP = "spion::block_sparse_attention_fwd"
_BWD_OP = "spion::block_sparse_attention_bwd"

_lock = threading.Lock()
_registered = False


def _op_defined(qualname: str) -> bool:
    namespace, name = qualname.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


def register_cuda_kernels() -> bool:
    """Register the Triton forward/backward kernels for the CUDA dispatch key.

    Returns True once registered (now or earlier); False if the ops are not defined (the op
    module is missing) or Triton cannot be used, in which case the ops keep their other kernels.
    """
    global _registered
    with _lock:
        if _registered:
            return True
        try:
            # Defining the ops is that module's job; importing it first makes sure the schema
            # exists before we attach a kernel to it.
            importlib.import_module("spion_fx.kernels.attention.block_sparse_op")
        except ImportError:
            return False
        if not (_op_defined(_FWD_OP) and _op_defined(_BWD_OP)):
            return False
        try:
            from spion_fx.kernels.attention.triton_attention import (
                triton_block_sparse_bwd,
                triton_block_sparse_fwd,
            )
        except ImportError:  # no triton on this platform
            return False
        torch.library.register_kernel(_FWD_OP, "cuda", triton_block_sparse_fwd)
        torch.library.register_kernel(_BWD_OP, "cuda", triton_block_sparse_bwd)
        _registered = True
        return True


__all__ = ["register_cuda_kernels"]
