"""SPION pattern generation written the way the authors wrote it (the test oracle and the baseline).

Deliberately plain and slow: a 31 x 31 identity-kernel conv2d, avg_pool2d, np.quantile, and a
recursive per-cell flood fill in Python. Faithful to ALGORITHMS.md section 1; the only liberty is
that the computation runs in the dtype of the input (the original used float32), so tests can feed
float64 inputs whose sums are exact and compare patterns bit for bit. Like the original, L must be
a multiple of block_size (avg_pool2d would silently drop a remainder); zero-pad A_s first to model
other lengths. Use `spion_fx.runtime.pattern.generate_pattern` for real work.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["flood_fill_original", "generate_pattern_original", "pooled_original"]


def pooled_original(attn: Tensor, block_size: int, filter_size: int | None = 31) -> np.ndarray:
    """conv2d with the identity kernel (skipped when filter_size is None), then avg_pool2d."""
    if attn.shape[-1] % block_size:
        raise ValueError("the original needs L to be a multiple of block_size")
    x = attn[None, None]
    if filter_size is not None:
        kernel = torch.eye(filter_size, dtype=attn.dtype, device=attn.device)[None, None]
        x = F.conv2d(x, kernel, padding=filter_size // 2)
    return F.avg_pool2d(x, block_size)[0, 0].cpu().numpy()


def _flood_fill(pool_out: np.ndarray, out: np.ndarray, x: int, y: int, threshold, nb: int) -> None:
    """One greedy walk: move to the largest of down / right / diagonal, mark if above threshold."""
    if x >= nb or y >= nb:
        return
    down, right, diag = pool_out[x + 1][y], pool_out[x][y + 1], pool_out[x + 1][y + 1]
    if down > right and down > diag:
        x, y = x + 1, y
    elif right > diag:
        x, y = x, y + 1
    else:
        x, y = x + 1, y + 1
    if pool_out[x][y] > threshold:
        out[x][y] = 1
    _flood_fill(pool_out, out, x, y, threshold, nb)


def flood_fill_original(pool_out: np.ndarray, quantile: float = 0.98) -> Tensor:
    """Threshold = np.quantile, 2*nb recursive walks from the first row and column, forced diagonal."""
    threshold = np.quantile(pool_out, quantile)
    nb = pool_out.shape[0]
    padded = np.zeros((nb + 1, nb + 1), dtype=pool_out.dtype)  # walks may look one past the edge
    padded[:nb, :nb] = pool_out
    out = np.zeros((nb + 1, nb + 1), dtype=np.int64)

    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old_limit, 4 * nb + 1000))  # a walk recurses up to 2*nb deep
    try:
        for k in range(nb):
            _flood_fill(padded, out, 0, k, threshold, nb)
            _flood_fill(padded, out, k, 0, threshold, nb)
    finally:
        sys.setrecursionlimit(old_limit)

    pattern = out[:nb, :nb].astype(bool)
    np.fill_diagonal(pattern, True)
    return torch.from_numpy(pattern)


def generate_pattern_original(
    attn: Tensor,
    block_size: int,
    quantile: float = 0.98,
    filter_size: int | None = 31,
) -> Tensor:
    """[L, L] scores -> [nb, nb] bool pattern; filter_size=None is variant F, 31 is CF."""
    return flood_fill_original(pooled_original(attn, block_size, filter_size), quantile)
