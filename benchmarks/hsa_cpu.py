"""CPU benchmark: MST's Hybrid Sparse Attention (strided, local+strided) vs dense causal SDPA, fwd+bwd.

Standalone: ``python benchmarks/hsa_cpu.py [--quick]``. Both HSA modes run their sparse kernels
(residue-class attention; diagonal blocks on the block-sparse op plus the window's previous-block
part and the strided keys, merged by log-sum-exp); the baseline is PyTorch's fused causal SDPA on
the same inputs, timed interleaved in the same run (medians).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import interleaved_medians, print_table  # noqa: E402

from spion_fx.kernels.hsa import hsa_mask, hybrid_sparse_attention  # noqa: E402


def _fwd_bwd(attn, q, k, v):
    grad = torch.randn_like(q)

    def step() -> None:
        torch.autograd.grad(attn(q, k, v), (q, k, v), grad)

    return step


def bench(length: int, stride: int, local: int, reps: int) -> list[dict]:
    b, h, d = 1, 8, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, generator=gen).requires_grad_(True) for _ in range(3))
    fns = [
        _fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v),
        _fwd_bwd(lambda q, k, v: hybrid_sparse_attention(q, k, v, stride=stride), q, k, v),
        _fwd_bwd(lambda q, k, v: hybrid_sparse_attention(q, k, v, stride=stride, local=local), q, k, v),
    ]
    dense, strided, local_strided = interleaved_medians(fns, reps)
    rows = []
    for mode, seconds, window in (("strided", strided, 0), ("local+strided", local_strided, local)):
        mask = hsa_mask(length, stride, window)
        rows.append({
            "case": f"fwd+bwd L={length} {mode} stride={stride}" + (f" local={local}" if window else ""),
            "keys/causal keys": round(mask.sum().item() / (length * (length + 1) / 2), 4),
            "causal_sdpa_ms": dense * 1e3,
            "hsa_ms": seconds * 1e3,
            "speedup": dense / seconds,
        })
    return rows


def bench_dropout(length: int, stride: int, local: int, p: float, reps: int) -> dict:
    """Attention dropout in training (GPT-2's default 0.1): the two small parts run explicitly."""
    b, h, d = 1, 8, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, generator=gen).requires_grad_(True) for _ in range(3))
    dense, hsa = interleaved_medians(
        [
            _fwd_bwd(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p), q, k, v),
            _fwd_bwd(lambda q, k, v: hybrid_sparse_attention(q, k, v, stride=stride, local=local, dropout_p=p), q, k, v),
        ],
        reps,
    )
    mask = hsa_mask(length, stride, local)
    return {
        "case": f"fwd+bwd L={length} local+strided stride={stride} local={local} dropout={p}",
        "keys/causal keys": round(mask.sum().item() / (length * (length + 1) / 2), 4),
        "causal_sdpa_ms": dense * 1e3,
        "hsa_ms": hsa * 1e3,
        "speedup": dense / hsa,
    }


def run(quick: bool = False) -> list[dict]:
    reps = 3 if quick else 7
    rows = bench(2048, 128, 128, reps)
    if not quick:
        rows += bench(4096, 128, 128, 5)
        rows.append(bench_dropout(2048, 128, 128, 0.1, 5))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print_table("Hybrid Sparse Attention (CPU, B=1 H=8 D=64)", run(parser.parse_args().quick))
