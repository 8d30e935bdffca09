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

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import fwd_bwd_step, interleaved_medians, print_table, random_qkv  # noqa: E402

from spion_fx.kernels.attention.hsa import hsa_mask, hybrid_sparse_attention  # noqa: E402


def _row(case: str, length: int, stride: int, local: int, dense_s: float, hsa_s: float) -> dict:
    keys = hsa_mask(length, stride, local).sum().item()
    return {
        "case": case,
        "keys/causal keys": round(keys / (length * (length + 1) / 2), 4),
        "causal_sdpa_ms": dense_s * 1e3,
        "hsa_ms": hsa_s * 1e3,
        "speedup": dense_s / hsa_s,
    }


def bench(length: int, stride: int, local: int, reps: int, dropout_p: float = 0.0) -> list[dict]:
    """Strided and local+strided against causal SDPA; with dropout (GPT-2's default 0.1 in
    training) only local+strided, whose two small parts then run on explicit scores."""
    q, k, v = random_qkv(1, 8, length, 64)
    modes = {"local+strided": local} if dropout_p else {"strided": 0, "local+strided": local}
    fns = [fwd_bwd_step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p), q, k, v)]
    fns += [
        fwd_bwd_step(lambda q, k, v, w=w: hybrid_sparse_attention(q, k, v, stride=stride, local=w, dropout_p=dropout_p), q, k, v)
        for w in modes.values()
    ]
    dense, *sparse = interleaved_medians(fns, reps)
    rows = []
    for (mode, window), seconds in zip(modes.items(), sparse):
        case = f"fwd+bwd L={length} {mode} stride={stride}" + (f" local={window}" if window else "")
        rows.append(_row(case + (f" dropout={dropout_p}" if dropout_p else ""), length, stride, window, dense, seconds))
    return rows


def run(quick: bool = False) -> list[dict]:
    reps = 3 if quick else 7
    rows = bench(2048, 128, 128, reps)
    if not quick:
        rows += bench(4096, 128, 128, 5)
        rows += bench(2048, 128, 128, 5, dropout_p=0.1)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print_table("Hybrid Sparse Attention (CPU, B=1 H=8 D=64)", run(parser.parse_args().quick))
