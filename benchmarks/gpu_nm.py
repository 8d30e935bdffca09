"""GPU rows for N:M weights: which kernel earns its place, at which shape, and what training costs.

``gpu_rows(deadline)`` (imported by benchmarks/gpu_suite.py) measures on CUDA and returns rows
``{what, ours_ms, baseline, baseline_ms, ratio, target, note}`` (ratio = baseline / ours, > 1 is
faster than the baseline), stopping early once ``time.perf_counter() > deadline``:

1. Prefill shape x [8192 × 4096] · W [4096 × 4096]ᵀ bf16: every kernel finalize can pick
   (cuSPARSELt and CUTLASS 2:4, the packed Triton matmul) against dense, and finalize's own pick,
   which must never be slower than dense.
2. Decoding (tokens 1, 4, 16) at W [4096 × 4096], [11008 × 4096] and [4096 × 11008], 2:4 and 1:8:
   the Triton decode GEMV (and cuSPARSELt at 2:4) against dense. Weights rotate over enough
   copies to exceed L2, so a memory-bound kernel is timed from HBM, not from cache; each timing
   covers a loop of calls so launch latency is amortised alike for both sides.
3. An SR-STE (``nm-2:4``) training step of HF GPT-2 (vocab 256, 1024 positions, d768, 6 layers,
   12 heads), B=2, L=1024, bf16 autocast, fused AdamW, against the dense step under the same
   pipeline; masks recomputed every step (the policy default) and every 100 steps. Beside it, the
   cost of one mask refresh: the one-pass Triton mask kernel vs abs + topk + scatter.
Every kernel's output is checked against the dense masked product before it is timed; one that
disagrees gets a row saying so instead of a time. On a machine without CUDA it returns [].

Sections run most telling first and only when the time they need is left (the train-step rows
need minutes of compilation): decode at 4096 × 4096, prefill, mask refresh, the other decode
shapes, the tile sweep, the training step. Run alone for all of them:

    python benchmarks/gpu_nm.py   # prints the rows (minutes: three GPT-2 models compile)
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import print_table  # also puts the repository on sys.path

from spion_fx.kernels.nm import semi_structured, triton_nm
from spion_fx.kernels.nm.packed import index_bits, pack_nm
from spion_fx.lowering import nm_select
from spion_fx.runtime.nm import nm_mask

PREFILL = (8192, 4096, 4096)  # tokens, in, out
DECODE_WEIGHTS = ((4096, 4096), (11008, 4096), (4096, 11008))  # (out, in)
DECODE_TOKENS = (1, 4, 16)
DECODE_TARGET = {(2, 4): 1.2, (1, 8): 1.5}
# GEMV tiles tried beside the default, (BLOCK_K, BLOCK_O); the best goes in a row of its own,
# so one GPU run also says how far the default heuristic is from the best of these.
GEMV_SWEEP = ((64, 8), (128, 16), (256, 8), (128, 32), (64, 64))
L2_BYTES = 256 << 20  # rotate weights over at least this much memory (several times any L2)

Timer = Callable[[Callable[[int], object], int], float]  # timer(fn(i), copies) -> ms per call


def cuda_ms(fn: Callable[[int], object], copies: int, reps: int = 15, inner: int = 20) -> float:
    """Median ms per call of ``fn(i)`` (i cycles over ``copies`` weight copies), CUDA events
    around ``inner`` calls at a time."""
    for i in range(3):
        fn(i % copies)
    torch.cuda.synchronize()
    samples = []
    k = 0
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn(k % copies)
            k += 1
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def row(what: str, ours_ms: float, baseline: str, baseline_ms: float, target: str, note: str) -> dict[str, Any]:
    ratio = baseline_ms / ours_ms if ours_ms and not math.isnan(ours_ms) else float("nan")
    return {"what": what, "ours_ms": ours_ms, "baseline": baseline, "baseline_ms": baseline_ms,
            "ratio": ratio, "target": target, "note": note}


def _agrees(y: torch.Tensor, ref: torch.Tensor) -> bool:
    scale = float(ref.abs().max()) or 1.0
    return bool(torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2 * scale))


class _Weights:
    """``copies`` independent N:M weights of one shape, dense-masked and packed."""

    def __init__(self, out_f: int, in_f: int, n: int, m: int, dtype: torch.dtype, device: str, copies: int):
        g = torch.Generator(device=device).manual_seed(out_f + in_f + m)
        self.n, self.m, self.in_f = n, m, in_f
        self.dense, self.masks, self.values, self.index = [], [], [], []
        for _ in range(copies):
            w = torch.randn(out_f, in_f, generator=g, device=device, dtype=torch.float32).to(dtype)
            mask = nm_mask(w, n, m)
            wm = w * mask
            values, index = pack_nm(wm, n, m, mask)
            self.dense.append(wm)
            self.masks.append(mask)
            self.values.append(values)
            self.index.append(index)

    def triton(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return triton_nm.nm_linear(x, self.values[i], self.index[i], self.n, self.m, self.in_f, index_bits(self.m))

    def gemv(self, x: torch.Tensor, i: int, config: dict[str, int]) -> torch.Tensor:
        return triton_nm.nm_gemv(x, self.values[i], self.index[i], self.n, self.m, self.in_f,
                                 index_bits(self.m), config=config)


def _copies(out_f: int, in_f: int, dtype: torch.dtype, device: str) -> int:
    if not device.startswith("cuda"):
        return 1
    return max(1, min(16, -(-L2_BYTES // (out_f * in_f * torch.tensor([], dtype=dtype).element_size()))))


def _kernel_rows(
    label: str, x: torch.Tensor, weights: _Weights, kernels: dict[str, Callable[[int], torch.Tensor]],
    timer: Timer, copies: int, target: str, device_note: str,
) -> list[dict[str, Any]]:
    ref = F.linear(x, weights.dense[0])
    dense_ms = timer(lambda i: F.linear(x, weights.dense[i]), copies)
    rows = []
    for name, fn in kernels.items():
        try:
            ok = _agrees(fn(0), ref)
        except Exception as exc:  # a library refusing this shape on this GPU: say so
            rows.append(row(f"{label} {name}", float("nan"), "dense F.linear", dense_ms, target,
                            f"failed: {exc}"[:160] + f"; {device_note}"))
            continue
        if not ok:
            rows.append(row(f"{label} {name}", float("nan"), "dense F.linear", dense_ms, target,
                            f"output differs from dense masked reference; not timed; {device_note}"))
            continue
        rows.append(row(f"{label} {name}", timer(fn, copies), "dense F.linear", dense_ms, target, device_note))
    return rows


def _gemv_sweep_row(label: str, x: torch.Tensor, weights: _Weights, timer: Timer, copies: int, target: str,
                    note: str) -> list[dict[str, Any]]:
    """The best GEMV tile of GEMV_SWEEP at this shape, as one row naming its tile."""
    sms = triton_nm.gemv_sm_count(x)
    n_kept = weights.values[0].shape[1]
    configs = [triton_nm.gemv_config(x.shape[0], weights.dense[0].shape[0], n_kept, weights.n, sms,
                                     block_k=bk, block_o=bo) for bk, bo in GEMV_SWEEP]
    configs = [c for c in configs if c["BLOCK_T"] * c["BLOCK_O"] * c["BLOCK_K"] <= 16384]  # registers
    kernels = {f"triton GEMV BLOCK_K={c['BLOCK_K']} BLOCK_O={c['BLOCK_O']} SPLIT={c['SPLIT']}":
               (lambda i, c=c: weights.gemv(x, i, c)) for c in configs}
    rows = _kernel_rows(label, x, weights, kernels, timer, copies, target, note)
    timed = [r for r in rows if not math.isnan(r["ours_ms"])]
    if not timed:
        return rows[:1]  # the first failure says why
    best = min(timed, key=lambda r: r["ours_ms"])
    best["what"] = best["what"].replace("triton GEMV", "triton GEMV best of sweep,")
    return [best]


def semi_kernels(weights: _Weights, x: torch.Tensor) -> dict[str, Callable[[int], torch.Tensor]]:
    """cuSPARSELt / CUTLASS callables for a 2:4 weight set, where the device offers them."""
    found: dict[str, Callable[[int], torch.Tensor]] = {}
    for kind in semi_structured.KINDS:
        if semi_structured.unavailable(kind, weights.dense[0], weights.n, weights.m) is not None:
            continue
        compressed = [semi_structured.compress(kind, w) for w in weights.dense]
        out_f = weights.dense[0].shape[0]
        alg = semi_structured.search_alg(compressed[0], x, None) if kind == "cusparselt" else 0
        found[kind] = (lambda i, c=compressed, kind=kind, out_f=out_f, alg=alg:
                       semi_structured.linear(kind, x, c[i], None, out_f, alg))
    return found


def prefill_rows(deadline: float, *, device: str = "cuda", shape=PREFILL, patterns=((2, 4), (1, 8)),
                 timer: Timer = cuda_ms, dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    tokens, in_f, out_f = shape
    note = _device_note(device)
    rows = []
    for n, m in patterns:
        if time.perf_counter() > deadline:
            break
        x = torch.randn(tokens, in_f, device=device, dtype=dtype)
        weights = _Weights(out_f, in_f, n, m, dtype, device, copies=1)
        label = f"N:M {n}:{m} x[{tokens}x{in_f}]·W[{out_f}x{in_f}]ᵀ {str(dtype)[6:]}"
        kernels = {**semi_kernels(weights, x), "triton packed": lambda i, w=weights, x=x: w.triton(x, i)}
        rows += _kernel_rows(label, x, weights, kernels, timer, 1, "context (the pick must be >= 1)", note)
        with tempfile.TemporaryDirectory() as tmp:  # finalize's selection, fresh measurement
            choice, _ = nm_select.choose_kernel(
                weights.dense[0], None, n, m, weights.masks[0], tokens=tokens,
                cache=nm_select.TimingCache(f"{tmp}/t.json"))
        dense_ms = choice.times_ms["dense"]
        rows.append(row(f"{label} finalize(mode=speed) picks {choice.kernel}", choice.times_ms[choice.kernel],
                        "dense F.linear", dense_ms, ">= 1.0 (never slower than dense)",
                        f"{choice.summary()}; {note}"[:400]))
    return rows


def decode_rows(deadline: float, *, device: str = "cuda", weights_shapes=DECODE_WEIGHTS,
                tokens_list=DECODE_TOKENS, patterns=((2, 4), (1, 8)), timer: Timer = cuda_ms,
                dtype: torch.dtype = torch.bfloat16, sweep: bool = True,
                sweep_only: bool = False) -> list[dict[str, Any]]:
    """Decode rows: the default GEMV (and cuSPARSELt at 2:4) vs dense, then (``sweep``) the best
    tile of GEMV_SWEEP; ``sweep_only`` gives just the sweep rows."""
    note = _device_note(device)
    rows = []
    for out_f, in_f in weights_shapes:
        for n, m in patterns:
            if time.perf_counter() > deadline:
                return rows
            copies = _copies(out_f, in_f, dtype, device)
            weights = _Weights(out_f, in_f, n, m, dtype, device, copies)
            target = f">= {DECODE_TARGET.get((n, m), 1.0)}"
            for tokens in tokens_list:
                x = torch.randn(tokens, in_f, device=device, dtype=dtype)
                label = f"decode N:M {n}:{m} T={tokens} W[{out_f}x{in_f}] {str(dtype)[6:]}"
                if not sweep_only:
                    kernels = {"triton GEMV": lambda i, x=x, w=weights: w.triton(x, i)}
                    if (n, m) == (2, 4):
                        kernels.update(semi_kernels(weights, x))
                    rows += _kernel_rows(label, x, weights, kernels, timer, copies, target,
                                         f"{copies} weight copies rotated; {note}")
                if sweep or sweep_only:
                    rows += _gemv_sweep_row(label, x, weights, timer, copies, target, note)
    return rows


def mask_rows(deadline: float, *, device: str = "cuda", shapes=((768, 2304), (4096, 4096)),
              timer: Timer = cuda_ms) -> list[dict[str, Any]]:
    """The per-step mask refresh of SR-STE (fp32 master weights, 2:4): one Triton pass vs topk."""
    rows = []
    note = _device_note(device)
    for shape in shapes:
        if time.perf_counter() > deadline:
            break
        w = torch.randn(shape, device=device)
        refresh = {kernel: (lambda i, w=w, kernel=kernel: nm_mask(w, 2, 4, kernel=kernel)) for kernel in ("auto", "topk")}
        same = torch.equal(refresh["auto"](0), refresh["topk"](0))
        ours_ms = timer(refresh["auto"], 1) if same else float("nan")
        rows.append(row(f"SR-STE mask refresh 2:4 W{list(shape)} fp32", ours_ms, "abs+topk+scatter",
                        timer(refresh["topk"], 1),
                        "context (cost per refresh)", ("" if same else "masks differ; not timed; ") + note))
    return rows


def train_step_rows(deadline: float, *, device: str = "cuda", reps: int = 10, config=(768, 6, 12, 1024),
                    batch: int = 2, inner: str | None = None, warmup: int = 3) -> list[dict[str, Any]]:
    """SR-STE GPT-2 step vs dense (same pipeline; ``inner=None``: the default inner compiler)."""
    import nm_linear

    base = nm_linear.gpt2(*config)
    seq = config[3]
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    variants = [v for v in nm_linear.STEP_VARIANTS if not v[3]]  # the unfused patch only acts in eager
    models: dict[str, Any] = {}
    samples = nm_linear.step_times(base, ids, variants, reps=reps, warmup=warmup, device=device, autocast=torch.bfloat16,
                                   fused_adamw=device.startswith("cuda"), inner=inner, deadline=deadline,
                                   models=models)
    dense = statistics.median(samples["dense"]) if samples["dense"] else float("nan")
    note = _device_note(device)
    rows = []
    for name, times in samples.items():
        if name == "dense" or not times:
            continue
        checks = _step_checks(models[name], models["losses"].get(name))
        ms = statistics.median(times) if not checks else float("nan")
        rows.append(row(f"GPT-2 d{base.config.n_embd} {base.config.n_layer}L train step B={ids.shape[0]} "
                        f"L={ids.shape[1]} bf16, {name}", ms, "dense step (same pipeline)", dense,
                        "step/dense <= 1.05 (ratio >= 0.952)",
                        f"{len(times)} interleaved steps; {checks or 'masks 2:4, loss finite'}; {note}"))
    return rows


def _step_checks(model: torch.nn.Module, loss: float | None) -> str:
    """'' when the sparse model trained as it should (finite loss, every active mask N:M)."""
    from spion_fx.runtime.nm import is_nm

    if loss is None or not math.isfinite(loss):
        return f"loss {loss}: not timed"
    sites = [s for s in model.spion_state.linear.sites.values() if s.active and s.nm is not None]
    if not sites:
        return "no active N:M site"
    bad = [s.name for s in sites if not is_nm(s.mask, *s.nm, transposed=s.weight_transposed)]
    return f"masks not N:M at {bad[:3]}" if bad else ""


def _device_note(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{device}, torch {torch.__version__}"


# (section, seconds it needs to be worth starting): most telling rows first, since the suite may
# give this module well under a minute; compiling three GPT-2 models for the step rows takes minutes.
def _plan() -> list[tuple[Callable[[float], list[dict[str, Any]]], float]]:
    square, rest = DECODE_WEIGHTS[:1], DECODE_WEIGHTS[1:]
    return [
        (lambda d: decode_rows(d, weights_shapes=square, sweep=False), 0.0),
        (prefill_rows, 10.0),
        (mask_rows, 3.0),
        (lambda d: decode_rows(d, weights_shapes=rest, sweep=False), 5.0),
        (lambda d: decode_rows(d, sweep_only=True), 30.0),
        (train_step_rows, 240.0),
    ]


def gpu_rows(deadline: float) -> list[dict[str, Any]]:
    """All rows above, on CUDA, as many as fit before ``deadline`` (``time.perf_counter()``, which
    on Linux reads the same CLOCK_MONOTONIC as ``time.monotonic``); [] without CUDA."""
    if not torch.cuda.is_available():
        return []
    rows: list[dict[str, Any]] = []
    for section, needs_s in _plan():
        if deadline - time.perf_counter() < max(needs_s, 0.0) or time.perf_counter() > deadline:
            continue
        try:
            rows += section(deadline)
        except Exception as exc:  # one section failing must not lose the others' rows
            print(f"[gpu_nm] a section failed: {exc}")
    return rows


if __name__ == "__main__":
    print_table("N:M on GPU", gpu_rows(time.perf_counter() + 1500))
