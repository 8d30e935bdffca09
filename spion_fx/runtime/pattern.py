"""SPION block-pattern generation (variants CF, F and C, and our coverage variant P), vectorised.

`generate_pattern` turns a post-softmax attention score matrix A_s into an nb x nb boolean block
pattern, following the authors' code exactly (see ALGORITHMS.md section 1 and
`pattern_original.py`, the readable oracle this module is tested against):

* **filter** (CF, C): out[i, j] = sum_{t=-r..r} A[i+t, j+t], zero padded, r = filter_size // 2
  (the original's 31 x 31 identity-kernel conv2d with padding 15).
* **pool**: B x B average pooling. Filter and pooling are both linear, so we never build the
  filtered L x L matrix: each pooled cell is a sum of 2r+1 diagonally shifted B x B rectangles of A,
  and every such rectangle is split into four corner pieces of the B x B tiles it straddles. Per
  tile we only need its row/column sums and the 2-D prefix sums of its (r+1) x (r+1) corners, so
  the cost is a few passes over A instead of the conv's L^2 * filter_size^2 multiply-adds.
  Every quantity is a sum of the entries it covers (contractions with 0/1 weights, never a
  difference of two sums), so there is no cancellation and a region of exact zeros (underflowed
  or masked probabilities) pools to exactly 0, keeping the exact ties the original sees there.
  Sums inside a tile use the input dtype (float32 or float64; half types are upcast to
  float32), everything across tiles is float64. With float64 input the pooled grid matches
  conv2d + avg_pool2d to ~1e-16; with float32 input both we and the float32 original are ~1e-7
  accurate, so patterns can differ only where two nonzero pooled values agree to ~1e-6.
* **threshold** (CF, F): the q-quantile of the pooled grid with linear interpolation
  (`torch.quantile(..., interpolation="linear")`, computed in float64). This is numpy's default
  `np.quantile(method="linear")`, which the original used; both use the same index rule
  (q * (n - 1)) and the same two-sided lerp, so the thresholds agree bit for bit in float64.
* **walks** (CF, F): 2*nb greedy walks on the pooled grid zero-padded to (nb+1) x (nb+1), one from
  every first-row cell (0, k) and every first-column cell (k, 0). A step from (x, y) goes to
  down (x+1, y) only if down > right and down > diag; otherwise to right (x, y+1) if
  right > diag; otherwise to diag (x+1, y+1). So on ties diagonal wins over everything and right
  wins over down. The cell moved into is marked if its pooled value > threshold (strict); a walk
  ends when it leaves the nb x nb grid; a start cell is not marked by its own walk. The move
  depends only on the cell, so we precompute a "next cell" table once and advance all walks
  together with one gather per step (at most 2*nb - 1 steps).
* **top-k** (C): k = floor(n_cells * density - nb) strictly off-diagonal cells with the largest
  pooled values (ties: lower row-major index first), then the diagonal; exactly k + nb blocks.
  n_cells = nb^2, or nb(nb+1)/2 with causal=True, where candidates are the strictly-lower cells
  (so `pattern_density(p, causal=True)` is about `density`). The original ran top-k over all
  cells, diagonal included, so it could keep fewer than k + nb blocks; we do not copy that.
* **coverage** (P, ours, not in the original): the fewest blocks of the raw (unfiltered) map whose
  attention mass reaches `coverage` of the map's mass, diagonal first, optionally capped by
  `max_density`; see `coverage.py`.
* The block diagonal is always forced on; causal=True then drops every block above the diagonal.

**Any L**: A is zero padded to nb * B, nb = ceil(L / B), exactly what the original would compute
on a zero-padded A_s (its conv already pads with zeros). Padding only adds zeros, so it can lower
the average of the last (partial) block row/column but never raises a pooled value: it creates no
spurious blocks, and no block lies entirely in the padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["VARIANTS", "block_scores", "generate_pattern", "pattern_density", "resize_pattern"]

VARIANTS = ("cf", "f", "c", "p")


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _as_score_stack(attn: Tensor) -> Tensor:
    """Return A as [H, L, L] (H = 1 for a single matrix) after checking type and shape."""
    if not isinstance(attn, Tensor):
        raise TypeError(f"attn must be a torch.Tensor, got {type(attn).__name__}")
    if not attn.is_floating_point():
        raise TypeError(f"attn must be a floating-point tensor, got dtype {attn.dtype}")
    if attn.dim() not in (2, 3) or attn.shape[-1] != attn.shape[-2] or attn.shape[-1] == 0:
        raise ValueError(
            f"attn must be [L, L] or [H, L, L] with L > 0, got shape {tuple(attn.shape)}"
        )
    return attn.unsqueeze(0) if attn.dim() == 2 else attn


# --------------------------------------------------------------------------------------------
# filter + pooling
# --------------------------------------------------------------------------------------------


def _split_points(block_size: int, radius: int) -> list[int]:
    """Split points k = t mod B of the shifts |t| <= radius (k = 0 is the unshifted block)."""
    return sorted({t % block_size for t in range(-radius, radius + 1)})


def _split_indicators(block_size: int, ks: list[int], like: Tensor) -> Tensor:
    """[B, 2K] 0/1 weights: column c < K selects index < ks[c], column K + c selects >= ks[c]."""
    j = torch.arange(block_size, device=like.device)[:, None]
    k = torch.tensor(ks, device=like.device)[None, :]
    return torch.cat([j < k, j >= k], 1).to(like.dtype)


# Elements of one chunk's [H, rows, B, Q, 2K] temporary on CPU: ~4 MB of float32 stays in cache,
# where the whole map's temporaries (65 MB each at L=4096, B=64) went to memory: 3-4x faster,
# same sums. A GPU takes the whole map in one pass (chunks would only add kernel launches).
_CPU_CHUNK_ELEMENTS = 1 << 20


def _quadrant_sums(tiles: Tensor, ks: list[int]) -> dict[str, Tensor]:
    """Per tile [H, P, B, Q, B] and split k in ks: the sums of its four quadrants (rows < k or
    >= k) x (cols < k or >= k), each [H, P, Q, K] float64.

    Both stages are contractions with 0/1 weights, so each result is a plain sum of the entries
    it covers: no a - b cancellation, and an all-zero quadrant (underflowed or masked
    probabilities) sums to exactly 0, keeping the exact ties that conv2d + avg_pool2d keep.
    Tile rows are taken a few at a time; each chunk's sums are the same operations on the same
    entries, so the result does not depend on the chunking.
    """
    h, nb, b = tiles.shape[:3]
    n = len(ks)
    w = _split_indicators(b, ks, tiles)
    upper, lower = (x.repeat(1, 2)[None, None, :, None, :] for x in (w[:, :n], w[:, n:]))
    above = torch.empty(h, nb, nb, 2 * n, dtype=torch.float64, device=tiles.device)  # rows < k
    below = torch.empty_like(above)  # rows >= k
    rows = max(1, _CPU_CHUNK_ELEMENTS // (h * b * nb * 2 * n)) if tiles.device.type == "cpu" else nb
    for start in range(0, nb, rows):
        chunk = tiles[:, start:start + rows]
        # Stage 1 (columns) is one GEMM over the chunk's tile rows, in the input precision.
        cols = (chunk.reshape(-1, b) @ w).view(h, chunk.shape[1], b, nb, 2 * n)  # [H, p, i, Q, 2K]
        # Stage 2 (rows): column split c pairs with the row split of the same k, so it is a
        # masked reduction over i (faster here than the equivalent batched GEMM with 2 columns).
        above[:, start:start + rows] = (cols * upper).sum(2)
        below[:, start:start + rows] = (cols * lower).sum(2)
    return {"tl": above[..., :n], "bl": below[..., :n], "tr": above[..., n:], "br": below[..., n:]}


def _shift_add(out: Tensor, x: Tensor, dp: int, dq: int) -> None:
    """out[.., I, J] += x[.., I+dp, J+dq], treating x as zero outside its grid (zero padding)."""
    n = x.shape[-1]
    i0, i1 = max(0, -dp), min(n, n - dp)
    j0, j1 = max(0, -dq), min(n, n - dq)
    if i0 < i1 and j0 < j1:
        out[..., i0:i1, j0:j1] += x[..., i0 + dp : i1 + dp, j0 + dq : j1 + dq]


def _block_sums(a: Tensor, block_size: int, radius: int) -> Tensor:
    """[H, Lp, Lp] (Lp = nb * B) -> [H, nb, nb] float64 block sums of the diagonally filtered A.

    Shift t = m*B + k (0 <= k < B) moves block (I, J) onto the tiles I+m, I+m+1 (rows) and
    J+m, J+m+1 (cols); within those tiles it covers the quadrants split at row k and column k:
    bottom-right of tile (I+m, J+m), bottom-left of (I+m, J+m+1), top-right of (I+m+1, J+m),
    top-left of (I+m+1, J+m+1).
    """
    h, lp, _ = a.shape
    b = block_size
    nb = lp // b
    tiles = a.reshape(h, nb, b, nb, b)
    if radius == 0:
        return tiles.sum(4).sum(2).to(torch.float64)

    ks = _split_points(b, radius)
    quads = _quadrant_sums(tiles, ks)
    position = {k: i for i, k in enumerate(ks)}
    out = torch.zeros(h, nb, nb, dtype=torch.float64, device=a.device)
    for t in range(-radius, radius + 1):
        m, k = divmod(t, b)
        c = position[k]
        _shift_add(out, quads["br"][..., c], m, m)
        _shift_add(out, quads["bl"][..., c], m, m + 1)
        _shift_add(out, quads["tr"][..., c], m + 1, m)
        _shift_add(out, quads["tl"][..., c], m + 1, m + 1)
    return out


def _pad_to_blocks(a: Tensor, block_size: int) -> Tensor:
    extra = -a.shape[-1] % block_size
    return F.pad(a, (0, extra, 0, extra)) if extra else a


def block_scores(
    attn: Tensor, *, block_size: int, filter_size: int | None = 31, per_head: bool = False
) -> Tensor:
    """Pooled (optionally diagonally filtered) block scores, float64.

    Returns [nb, nb] (a 3-D input is averaged over dim 0), or [H, nb, nb] with per_head=True.
    filter_size=None (or 1) skips the filter (variant F). Equals
    avg_pool2d(conv2d(A, eye(filter_size), padding=filter_size // 2), B) on the zero-padded A.
    """
    _check_positive_int("block_size", block_size)
    radius = 0 if filter_size is None else _filter_radius(filter_size)
    stack = _as_score_stack(attn)
    if stack.dtype not in (torch.float32, torch.float64):
        stack = stack.float()  # half-precision tile sums would lose too much
    # One head at a time keeps the float64 temporaries at one head's size.
    sums = torch.stack(
        [_block_sums(_pad_to_blocks(x, block_size)[None], block_size, radius)[0] for x in stack]
    )
    scores = sums / float(block_size * block_size)
    if attn.dim() == 2:
        return scores[0]
    return scores if per_head else scores.mean(0)


def _filter_radius(filter_size: int) -> int:
    _check_positive_int("filter_size", filter_size)
    if filter_size % 2 == 0:
        raise ValueError(f"filter_size must be odd ('same' padding), got {filter_size}")
    return filter_size // 2


# --------------------------------------------------------------------------------------------
# threshold, walks, top-k
# --------------------------------------------------------------------------------------------


def _quantile_threshold(scores: Tensor, quantile: float) -> Tensor:
    """[H, nb, nb] -> [H] thresholds; linear interpolation like np.quantile's default."""
    return torch.quantile(scores.flatten(1), quantile, dim=1, interpolation="linear")


def _next_cell_table(scores: Tensor) -> Tensor:
    """Flat index of the cell each cell's walk step moves to; H*nb*nb (a sentinel) = left the grid."""
    h, nb, _ = scores.shape
    padded = F.pad(scores, (0, 1, 0, 1))  # the original's zero-padded (nb+1) x (nb+1) grid
    down, right, diag = padded[:, 1:, :-1], padded[:, :-1, 1:], padded[:, 1:, 1:]
    go_down = (down > right) & (down > diag)
    go_right = ~go_down & (right > diag)
    idx = torch.arange(nb, device=scores.device)
    nx = idx[:, None] + (~go_right).long()  # down or diagonal
    ny = idx[None, :] + (~go_down).long()  # right or diagonal
    head = (torch.arange(h, device=scores.device) * nb * nb)[:, None, None]
    sentinel = h * nb * nb
    nxt = torch.where((nx < nb) & (ny < nb), head + nx * nb + ny, sentinel).flatten()
    return torch.cat([nxt, nxt.new_full((1,), sentinel)])  # the sentinel is absorbing


def _walk_marks(scores: Tensor, threshold: Tensor) -> Tensor:
    """[H, nb, nb] scores, [H] thresholds -> cells marked by the 2*nb greedy walks of each head."""
    h, nb, _ = scores.shape
    nxt = _next_cell_table(scores)
    idx = torch.arange(nb, device=scores.device)
    head = (torch.arange(h, device=scores.device) * nb * nb)[:, None]
    pos = (head + torch.cat([idx, idx * nb])[None, :]).flatten()  # (0, k) and (k, 0)
    visited = torch.zeros(h * nb * nb + 1, dtype=torch.bool, device=scores.device)
    # Each step raises x + y by at least 1 and a walk leaves once x or y reaches nb.
    for _ in range(2 * nb - 1):
        pos = nxt[pos]
        visited[pos] = True
    return visited[:-1].view(h, nb, nb) & (scores > threshold[:, None, None])


def _off_diagonal_budget(nb: int, density: float, causal: bool) -> int:
    cells = nb * (nb + 1) // 2 if causal else nb * nb
    candidates = nb * (nb - 1) // 2 if causal else nb * (nb - 1)
    return min(max(math.floor(cells * density - nb), 0), candidates)


def _topk_marks(scores: Tensor, density: float, causal: bool) -> Tensor:
    """The k largest strictly off-diagonal (strictly lower if causal) cells of each head."""
    h, nb, _ = scores.shape
    k = _off_diagonal_budget(nb, density, causal)
    ones = torch.ones(nb, nb, dtype=torch.bool, device=scores.device)
    candidate = ones.tril(-1) if causal else ~torch.eye(nb, dtype=torch.bool, device=scores.device)
    ranked = scores.masked_fill(~candidate, -math.inf).flatten(1)
    # Stable sort: ties go to the lower row-major index, so the result is deterministic.
    chosen = torch.argsort(ranked, dim=1, descending=True, stable=True)[:, :k]
    marks = torch.zeros(h, nb * nb, dtype=torch.bool, device=scores.device)
    marks.scatter_(1, chosen, True)
    return marks.view(h, nb, nb)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def _check_variant_args(
    variant: str, quantile: float, density: float | None, coverage: float, max_density: float | None
) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if density is not None and variant != "c":
        raise ValueError(f"density applies only to variant 'c', not {variant!r}; use quantile or coverage")
    if max_density is not None and variant != "p":
        raise ValueError(f"max_density applies only to variant 'p', not {variant!r}")
    if variant == "c":
        if density is None:
            raise ValueError("variant 'c' needs density (fraction of blocks to keep, in (0, 1])")
        if not 0.0 < float(density) <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density!r}")
    elif variant == "p":
        if not 0.0 < float(coverage) <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {coverage!r}")
        if max_density is not None and not 0.0 < float(max_density) <= 1.0:
            raise ValueError(f"max_density must be in (0, 1], got {max_density!r}")
    elif not 0.0 <= float(quantile) <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")


def generate_pattern(
    attn: Tensor,
    *,
    block_size: int,
    variant: str = "cf",
    quantile: float = 0.98,
    filter_size: int = 31,
    density: float | None = None,
    causal: bool = False,
    per_head: bool = False,
    coverage: float = 0.9,
    max_density: float | None = None,
) -> Tensor:
    """SPION block pattern of a post-softmax score matrix (see the module docstring).

    attn: [L, L], or [H, L, L] (averaged over dim 0 unless per_head=True). Any L; any float dtype;
    CPU or CUDA. Returns a bool tensor [nb, nb] ([H, nb, nb] with per_head), nb = ceil(L / B),
    on attn's device, block diagonal always on, nothing above it when causal. `quantile` and
    `filter_size` serve CF / F (F has no filter), `density` serves C, `coverage` and
    `max_density` serve P; the others are ignored.
    """
    _check_variant_args(variant, quantile, density, coverage, max_density)
    if per_head and attn.dim() != 3:
        raise ValueError(f"per_head=True needs attn of shape [H, L, L], got {tuple(attn.shape)}")
    if variant == "p":
        return _coverage_variant(attn, block_size, coverage, max_density, causal, per_head)
    size = None if variant == "f" else filter_size
    scores = block_scores(attn, block_size=block_size, filter_size=size, per_head=per_head)
    scores = scores if per_head else scores[None]
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("attn contains NaN or inf")

    if variant == "c":
        marks = _topk_marks(scores, float(density), causal)
    else:
        marks = _walk_marks(scores, _quantile_threshold(scores, float(quantile)))
    nb = scores.shape[-1]
    marks |= torch.eye(nb, dtype=torch.bool, device=marks.device)
    if causal:
        marks &= torch.ones(nb, nb, dtype=torch.bool, device=marks.device).tril()
    return marks if per_head else marks[0]


def _coverage_variant(
    attn: Tensor, block_size: int, coverage: float, max_density: float | None, causal: bool, per_head: bool
) -> Tensor:
    from spion_fx.runtime.coverage import block_mass, coverage_pattern

    _check_positive_int("block_size", block_size)
    mass = block_mass(_as_score_stack(attn), block_size)
    if not bool(torch.isfinite(mass).all()):
        raise ValueError("attn contains NaN or inf")
    mass = mass if per_head else mass.sum(0, keepdim=True)  # head average: same ranking as the mean
    marks = coverage_pattern(mass, coverage, causal=causal, max_density=max_density)
    return marks if per_head else marks[0]


def resize_pattern(
    pattern: Tensor, num_blocks: int, band: int = 1, *, causal: bool = True
) -> Tensor:
    """Fit a block pattern [.., nb, nb] to another length of num_blocks blocks per side.

    Shorter: crop the top-left num_blocks x num_blocks. Longer: keep the old pattern in the
    top-left; in the new rows/columns keep the block diagonal plus `band` sub-diagonals
    (0 <= i - j <= band), plus the same number of super-diagonals when causal=False
    (|i - j| <= band). The default never adds a block above the diagonal, so it is causal-safe.
    """
    _check_positive_int("num_blocks", num_blocks)
    if isinstance(band, bool) or not isinstance(band, int) or band < 0:
        raise ValueError(f"band must be a non-negative int, got {band!r}")
    if pattern.dim() < 2 or pattern.shape[-1] != pattern.shape[-2]:
        raise ValueError(f"pattern must be [.., nb, nb], got shape {tuple(pattern.shape)}")
    old = pattern.shape[-1]
    if num_blocks <= old:
        return pattern[..., :num_blocks, :num_blocks].clone()
    idx = torch.arange(num_blocks, device=pattern.device)
    offset = idx[:, None] - idx[None, :]
    keep = (offset >= 0) & (offset <= band) if causal else offset.abs() <= band
    out = keep.expand(*pattern.shape[:-2], num_blocks, num_blocks).clone()
    out[..., :old, :old] = pattern.bool()
    return out


def pattern_density(pattern: Tensor, causal: bool = False) -> float:
    """Fraction of kept blocks (averaged over any leading dims).

    causal=True: kept blocks on or below the diagonal over the nb(nb+1)/2 cells there.
    """
    if pattern.dim() < 2 or pattern.shape[-1] != pattern.shape[-2]:
        raise ValueError(f"pattern must be [.., nb, nb], got shape {tuple(pattern.shape)}")
    nb = pattern.shape[-1]
    p = pattern.bool()
    if not causal:
        return p.float().mean().item()
    lower = torch.ones(nb, nb, dtype=torch.bool, device=p.device).tril()
    heads = p[..., 0, 0].numel()
    return (p & lower).sum().item() / (heads * nb * (nb + 1) // 2)
