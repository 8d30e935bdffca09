"""Packed N:M linear layers: memory and speed against dense.

CPU: bytes of the packed format vs dense for transformer-sized layers (2:4, 1:8, 1:16; fp32 and
bf16), and the tiled-unpack packed matmul vs dense ``F.linear`` (medians; CPUs have no N:M units,
so expect the packed matmul to be slower — the packed form saves memory, not time, on CPU).
GPU (when CUDA is present): 2:4 semi-structured and Triton 1:8 / 1:16 forward vs dense at
[8192 × 4096] · [4096 × 4096]ᵀ in bf16.

    python benchmarks/nm_linear.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from spion_fx.kernels.nm.packed import PackedNMLinear, pack_nm, packed_linear_cpu
from spion_fx.runtime.nm import nm_mask

PATTERNS = [(2, 4), (1, 8), (1, 16)]


def _median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_memory(quick: bool) -> list[dict]:
    shapes = [(3072, 768), (768, 3072)] if quick else [(3072, 768), (768, 3072), (768, 768), (2304, 768)]
    rows = []
    for out_f, in_f in shapes:
        for n, m in PATTERNS:
            for dtype in (torch.float32, torch.bfloat16):
                w = torch.randn(out_f, in_f).to(dtype)
                mask = nm_mask(w, n, m)
                layer = PackedNMLinear.from_dense(w, None, n, m, mask=mask)
                dense = layer.dense_bytes()
                packed = layer.memory_bytes()
                rows.append({
                    "kind": "memory", "shape": f"{out_f}x{in_f}", "pattern": f"{n}:{m}",
                    "dtype": str(dtype).replace("torch.", ""), "dense_bytes": dense,
                    "packed_bytes": packed, "packed/dense": packed / dense,
                    "packed/ideal": packed / (dense * n / m),
                })
    return rows


def cpu_time(quick: bool) -> list[dict]:
    tokens = 256 if quick else 1024
    reps = 5 if quick else 15
    out_f, in_f = 3072, 768
    rows = []
    x = torch.randn(tokens, in_f)
    for n, m in PATTERNS:
        w = torch.randn(out_f, in_f)
        mask = nm_mask(w, n, m)
        values, idx = pack_nm(w * mask, n, m, mask)
        wm = w * mask
        t_dense = _median_s(lambda wm=wm: F.linear(x, wm), reps)
        t_packed = _median_s(
            lambda v=values, i=idx, n=n, m=m: packed_linear_cpu(x, v, i, n, m, in_f), reps)
        rows.append({"kind": "cpu_time", "shape": f"{tokens}x{in_f} -> {out_f}", "pattern": f"{n}:{m}",
                     "dtype": "float32", "dense_ms": t_dense * 1e3, "packed_ms": t_packed * 1e3,
                     "speedup": t_dense / t_packed})
    return rows


def gpu_time(quick: bool) -> list[dict]:
    if not torch.cuda.is_available():
        print("GPU benchmark skipped: CUDA is not available on this machine.")
        return [{"kind": "gpu_time", "skipped": "no CUDA"}]
    from spion_fx.kernels.nm import triton_nm
    from spion_fx.kernels.nm.packed import index_bits

    tokens, in_f, out_f = (2048, 4096, 4096) if quick else (8192, 4096, 4096)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, in_f, device=dev, dtype=dt)
    w = torch.randn(out_f, in_f, device=dev, dtype=dt)

    def cuda_ms(fn, reps=20):
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return statistics.median(times)

    t_dense = cuda_ms(lambda: F.linear(x, w))
    rows = []
    for n, m in PATTERNS:
        mask = nm_mask(w, n, m)
        wm = w * mask
        row = {"kind": "gpu_time", "shape": f"{tokens}x{in_f} -> {out_f}", "pattern": f"{n}:{m}",
               "dtype": "bfloat16", "dense_ms": t_dense}
        if (n, m) == (2, 4):
            try:
                from torch.sparse import to_sparse_semi_structured

                ws = to_sparse_semi_structured(wm)
                row["semi_structured_ms"] = cuda_ms(lambda ws=ws: F.linear(x, ws))
                row["speedup"] = t_dense / row["semi_structured_ms"]
            except Exception as exc:
                row["semi_structured_error"] = str(exc)[:120]
        values, idx = pack_nm(wm, n, m, mask)
        row["triton_ms"] = cuda_ms(
            lambda v=values, i=idx, n=n, m=m: triton_nm.nm_matmul(x, v, i, n, m, in_f, index_bits(m)))
        row["triton_speedup"] = t_dense / row["triton_ms"]
        rows.append(row)
    return rows


def run(quick: bool) -> list[dict]:
    return cpu_memory(quick) + cpu_time(quick) + gpu_time(quick)


def _print(rows: list[dict]) -> None:
    for kind in dict.fromkeys(r["kind"] for r in rows):
        sel = [r for r in rows if r["kind"] == kind]
        keys = list(dict.fromkeys(k for r in sel for k in r if k != "kind"))
        print(f"\n## {kind}  (device: {'cuda' if torch.cuda.is_available() else 'cpu'}, "
              f"threads: {torch.get_num_threads()})")
        print(" | ".join(keys))
        for r in sel:
            print(" | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    _print(run(parser.parse_args().quick))


if __name__ == "__main__":
    main()
