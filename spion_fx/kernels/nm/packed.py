"""Packed N:M weights and a linear layer that computes from them.

Format, for a weight [out, in] with exactly N kept entries in each group of M consecutive inputs:
- ``values``      [out, in·N/M], the kept entries in group order (ascending position in a group);
- ``index_bytes`` uint8 [out, ⌈K·b/8⌉], each entry's position inside its group, bit-packed with
  b ∈ {1, 2, 4, 8} bits (the smallest power of two with 2^b ≥ M, so an index never straddles a
  byte and unpacking is shifts and masks).
Bytes: K·(s + b/8) for element size s, i.e. a factor 1 + b/(8s) over the kept values alone:
2:4 → 1.06 (fp32) / 1.125 (bf16); 1:8, 1:16 → 1.125 (fp32) / 1.25 (bf16). For bf16 with M ≥ 8 no
index encoding can reach 1.15: log2(M) bits per kept 16-bit value is ≥ 19 % on its own.

Compute paths of `PackedNMLinear` (``backend``), with the reason recorded:
- ``triton``: the Triton N:M kernels (`triton_nm`: a decode GEMV for ≤ 64 tokens, tiles above);
- ``cusparselt`` / ``cutlass``: 2:4 fp16/bf16 on CUDA sparse tensor cores (`semi_structured`);
- ``cpu``: decompress row tiles of W on the fly and multiply (dense speed at best — CPUs have no
  N:M units, so the packed form saves memory, not time; see benchmarks/nm_linear.py);
- ``dense``: unpack the whole weight per call (a fallback, never fast).
``auto`` keeps the packed form: Triton on CUDA, ``cpu`` on CPU. Which path is *fastest* for a
layer is measured, not guessed: ``spion_fx.lowering.nm_select`` (used by ``finalize``) times the
candidates on the model's device and may also keep the layer dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spion_fx.kernels.nm import semi_structured, triton_nm


def index_bits(m: int) -> int:
    for bits in (1, 2, 4, 8):
        if (1 << bits) >= m:
            return bits
    raise ValueError(f"m={m} is too large for the packed N:M format (at most 256)")


def _positions(weight: Tensor, n: int, m: int, mask: Tensor | None) -> Tensor:
    """[out, in/M, N] ascending positions of the kept entries of each group; validates N-of-M."""
    out_f, in_f = weight.shape
    if in_f % m:
        raise ValueError(f"input size {in_f} is not a multiple of m={m}")
    groups = in_f // m
    if mask is not None:
        keep = mask.reshape(out_f, groups, m).bool()
        if not bool((keep.sum(-1) == n).all()):
            raise ValueError(f"mask is not {n}:{m}: some group does not keep exactly {n}")
        if bool((weight.reshape(out_f, groups, m) != 0)[~keep].any()):
            raise ValueError("weight has nonzeros outside the mask; bake W⊙M first")
    else:
        keep = weight.reshape(out_f, groups, m) != 0
        if bool((keep.sum(-1) > n).any()):
            raise ValueError(f"weight is not {n}:{m} sparse: some group has more than {n} nonzeros")
    # Kept (or nonzero) entries first, then the earliest zeros fill groups that have fewer than n.
    order = torch.arange(m, 0, -1, device=weight.device, dtype=torch.float32) / (m + 1)
    score = keep.float() + order
    return score.topk(n, dim=-1).indices.sort(dim=-1).values


def pack_nm(weight: Tensor, n: int, m: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(values, index_bytes) of an N:M-sparse [out, in] weight (see the module docstring)."""
    bits = index_bits(m)
    out_f, in_f = weight.shape
    pos = _positions(weight, n, m, mask)  # [out, G, N]
    base = torch.arange(0, in_f, m, device=weight.device).view(1, -1, 1)
    values = weight.gather(1, (base + pos).reshape(out_f, -1)).contiguous()
    idx = pos.reshape(out_f, -1).to(torch.int32)
    per_byte = 8 // bits
    pad = (-idx.shape[1]) % per_byte
    if pad:
        idx = F.pad(idx, (0, pad))
    shifts = torch.arange(per_byte, device=weight.device, dtype=torch.int32) * bits
    packed = (idx.view(out_f, -1, per_byte) << shifts).sum(-1).to(torch.uint8)
    return values, packed.contiguous()


def unpack_positions(index_bytes: Tensor, k: int, bits: int) -> Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=index_bytes.device, dtype=torch.int32) * bits
    pos = (index_bytes.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return pos.reshape(index_bytes.shape[0], -1)[:, :k]


def _columns(index_bytes: Tensor, k: int, n: int, m: int) -> Tensor:
    pos = unpack_positions(index_bytes, k, index_bits(m)).long()
    base = (torch.arange(k, device=index_bytes.device) // n) * m
    return base + pos


def unpack_nm(values: Tensor, index_bytes: Tensor, n: int, m: int, in_features: int) -> Tensor:
    cols = _columns(index_bytes, values.shape[1], n, m)
    dense = values.new_zeros(values.shape[0], in_features)
    return dense.scatter_(1, cols, values)


def packed_linear_cpu(
    x: Tensor, values: Tensor, index_bytes: Tensor, n: int, m: int, in_features: int,
    bias: Tensor | None = None, tile_out: int = 512,
) -> Tensor:
    """y = x·Wᵀ + b, decompressing W one tile of output rows at a time (bounded extra memory)."""
    out_f, k = values.shape
    y = x.new_empty(*x.shape[:-1], out_f)
    base = (torch.arange(k, device=values.device) // n) * m
    bits = index_bits(m)
    for o0 in range(0, out_f, tile_out):
        o1 = min(o0 + tile_out, out_f)
        cols = base + unpack_positions(index_bytes[o0:o1], k, bits).long()
        tile = values.new_zeros(o1 - o0, in_features).scatter_(1, cols, values[o0:o1])
        y[..., o0:o1] = F.linear(x, tile.to(x.dtype), None if bias is None else bias[o0:o1])
    return y


BACKENDS = ("auto", "cpu", "triton", "cusparselt", "cutlass", "semi_structured", "dense")


class PackedNMLinear(nn.Module):
    """Inference linear layer over a packed N:M weight (no weight gradient: use after finalize)."""

    def __init__(
        self, values: Tensor, index_bytes: Tensor, n: int, m: int, in_features: int,
        bias: Tensor | None = None, backend: str = "cpu", reason: str = "",
    ) -> None:
        super().__init__()
        self.n, self.m, self.in_features = n, m, in_features
        self.out_features = values.shape[0]
        self.register_buffer("values", values)
        self.register_buffer("index_bytes", index_bytes)
        self.register_buffer("bias", bias)
        self.backend, self.reason = backend, reason
        self._semi = None  # the compressed weight when backend is cusparselt or cutlass
        self._alg: dict[int, int] = {}  # cuSPARSELt algorithm per token count, searched on first use

    @classmethod
    def from_dense(
        cls, weight: Tensor, bias: Tensor | None, n: int, m: int, *, mask: Tensor | None = None,
        weight_transposed: bool = False, backend: str = "auto",
    ) -> PackedNMLinear:
        """Pack a masked weight ([out, in], or [in, out] when ``weight_transposed``). With
        ``mask``, W⊙M is packed and the mask must be exactly N of M; without, W must have at most
        N nonzeros per group (groups with fewer keep zeros as explicit values)."""
        w = weight.detach()
        mk = mask
        if weight_transposed:
            w = w.t()
            mk = None if mask is None else mask.t()
        if mk is not None:
            w = w * mk
        values, index_bytes = pack_nm(w.contiguous(), n, m, mk)
        b = None if bias is None else bias.detach().clone()
        layer = cls(values, index_bytes, n, m, w.shape[1], b)
        layer._choose_backend(w, backend)
        return layer

    def _choose_backend(self, w: Tensor, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
        if backend in ("cpu", "dense"):
            self.backend, self.reason = backend, "requested"
            return
        if backend == "auto" and not w.is_cuda:
            self.backend, self.reason = "cpu", "CPU: row tiles decompressed on the fly"
            return
        notes = []
        if backend == "semi_structured":  # either library, cuSPARSELt first
            semi_kinds = semi_structured.KINDS
        else:
            semi_kinds = (backend,) if backend in semi_structured.KINDS else ()
        for kind in semi_kinds:
            why = semi_structured.unavailable(kind, w, self.n, self.m)
            if why is None:
                try:
                    self._semi = semi_structured.compress(kind, w)
                    self.backend, self.reason = kind, f"CUDA 2:4 {kind}"
                    return
                except Exception as exc:  # unsupported GPU/shape: record and fall through
                    why = f"failed: {exc}"[:200]
            notes.append(f"no {kind}: {why}")
        triton_why = triton_nm.supports(self.n, self.m)
        if triton_why is None and not (w.is_cuda or triton_nm.interpreting()):
            triton_why = "not on CUDA"
        if triton_why is None:
            self.backend, self.reason = "triton", "; ".join(notes + ["Triton N:M kernels"])
            return
        notes.append(f"no triton: {triton_why}")
        self.backend, self.reason = "dense", "; ".join(notes + ["dense matmul on the unpacked weight"])

    def to_dense(self) -> Tensor:
        return unpack_nm(self.values, self.index_bytes, self.n, self.m, self.in_features)

    def memory_bytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.index_bytes.numel()

    def dense_bytes(self) -> int:
        return self.out_features * self.in_features * self.values.element_size()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        if self.backend in semi_structured.KINDS and self._semi is not None and x.is_cuda:
            x2 = x.reshape(-1, self.in_features)
            alg = 0
            if self.backend == "cusparselt":
                alg = self._alg.get(x2.shape[0])
                if alg is None:
                    alg = self._alg[x2.shape[0]] = semi_structured.search_alg(self._semi, x2, self.bias)
            y = semi_structured.linear(self.backend, x2, self._semi, self.bias, self.out_features, alg)
            return y.reshape(*lead, self.out_features)
        if self.backend == "triton" and (x.is_cuda or triton_nm.interpreting()):
            y = triton_nm.nm_linear(
                x.reshape(-1, self.in_features), self.values, self.index_bytes,
                self.n, self.m, self.in_features, index_bits(self.m),
            )
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*lead, self.out_features)
        if self.backend == "dense":
            return F.linear(x, self.to_dense().to(x.dtype), self.bias)
        return packed_linear_cpu(x, self.values, self.index_bytes, self.n, self.m, self.in_features, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"pattern={self.n}:{self.m}, backend={self.backend}")
