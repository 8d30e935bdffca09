"""The GPU suite: every GPU figure of issue #12 in one run of at most ~6 minutes on one GPU.

    PYTHONPATH=. python3 benchmarks/gpu_suite.py [--budget-s 330] [--no-write]   (make bench-gpu)

Needs PyTorch and Triton (transformers for the GPT-2 rows) and nothing else. Sections, in order,
each with a deadline inside the budget (a section that runs out stops between measurements and
lists what it skipped; later sections keep their share):

1. Block-sparse attention kernels (B=1, H=16, bf16; SPION-like patterns at ~5/10/25 % block
   density): ours (the ``spion::block_sparse_attention`` op, Triton) vs compiled FlexAttention
   with the same block mask vs dense flash SDPA, forward and forward+backward. Before any
   timing, ours is checked against FlexAttention's output and gradients on the same inputs; a
   point that disagrees is flagged MISMATCH and claims no target. First calls (JIT compiles:
   what a pattern switch pays) are rows of their own. The grid is trimmed to fit: the headline
   points first.
2. HF GPT-2 (6 layers, d768, 12 heads, L=8192, B=2, bf16 autocast, fused AdamW, clipping,
   stdlib-corpus bytes) step times: eager, ``spion_fx.sparsify`` dense phase, the switch stall,
   the sparse phase, ``torch.compile``; peak memory of each.
3. ``gpu_nm.gpu_rows(deadline)`` from benchmarks/gpu_nm.py when that module exists.

Timing: CUDA events around batches of back-to-back calls (one synchronisation per batch), median
over repetitions, warm-up excluded; host time per call is reported alongside, since a kernel
whose launch costs more host time than GPU time is host-bound. Rows share one shape,
``{"what", "ours_ms", "baseline", "baseline_ms", "ratio", "target", "note"}`` with ratio =
baseline_ms / ours_ms (> 1: ours faster). Raw results go to ``$OUT/gpu_suite.json`` (else
``out/``), rewritten after every section so a run cut short keeps what it measured; the GPU
section of BENCHMARKS.md (between its markers) is rewritten at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, Path(__file__).resolve().parent):
    if str(_path) not in sys.path:  # run as `python benchmarks/gpu_suite.py` without installing
        sys.path.insert(0, str(_path))

from common import rewrite_section as _rewrite_section  # noqa: E402  (benchmarks/ is on sys.path now)

BEGIN_MARKER = "<!-- gpu:begin -->"
END_MARKER = "<!-- gpu:end -->"
DEFAULT_BUDGET_S = 330.0


def rewrite_section(text: str, body: str, begin: str = BEGIN_MARKER, end: str = END_MARKER) -> str:
    """common.rewrite_section with this suite's markers."""
    return _rewrite_section(text, body, begin, end)


ROW_KEYS = ("what", "ours_ms", "baseline", "baseline_ms", "ratio", "target", "note")

# Share of the budget by which each section must be done (fractions of the total, from the
# start). GPT-2 needs the longest uninterrupted stretch (three compiles and a switch), so the
# kernel grid, which can stop after any point, goes first with a modest share.
SECTION_ENDS = {"kernels": 0.36, "gpt2": 0.88, "nm": 0.96}

NEEDS_CUDA = (
    "gpu_suite.py needs CUDA: no GPU is visible here, so nothing was measured and BENCHMARKS.md "
    "is unchanged. Kernel correctness runs on CPU under TRITON_INTERPRET=1 "
    "(tests/test_triton_attention.py); run this suite on a CUDA machine with "
    "`PYTHONPATH=. python3 benchmarks/gpu_suite.py` or `make bench-gpu`."
)


# ------------------------------------------------------------------------------------ rows


def make_row(
    what: str,
    ours_ms: float | None,
    baseline: str = "",
    baseline_ms: float | None = None,
    target: str = "",
    note: str = "",
) -> dict[str, Any]:
    """A result row; ratio = baseline_ms / ours_ms (speed-up of ours) when both are known."""
    ratio = None
    if ours_ms is not None and baseline_ms is not None and ours_ms > 0:
        ratio = baseline_ms / ours_ms
    return {"what": what, "ours_ms": ours_ms, "baseline": baseline, "baseline_ms": baseline_ms,
            "ratio": ratio, "target": target, "note": note}


def target_met(row: dict[str, Any]) -> bool | None:
    """Whether a row meets its target; None when it has no checkable target or no figure.

    Targets read ``>= X x`` (ratio at least X; also ``≥``) or ``<= X s`` (ours at most X seconds).
    """
    target = str(row.get("target") or "").replace("≥", ">=").replace("≤", "<=").strip()
    for prefix, unit, value in ((">=", "x", row.get("ratio")), ("<=", "s", row.get("ours_ms"))):
        if not target.startswith(prefix):
            continue
        body = target[len(prefix):].strip().replace("×", "x")
        if not body.endswith(unit):
            return None
        try:
            bound = float(body[: -len(unit)].strip())
        except ValueError:
            return None
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        return value >= bound if prefix == ">=" else value / 1000.0 <= bound
    return None


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def rows_table(rows: Iterable[dict[str, Any]]) -> str:
    """Markdown table of rows with a ``met`` column computed from each row's target."""
    columns = ["what", "ours ms", "baseline", "baseline ms", "ratio", "target", "met", "note"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row.get("what"), row.get("ours_ms"), row.get("baseline"), row.get("baseline_ms"),
                 row.get("ratio"), row.get("target"), target_met(row), row.get("note")]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- budget


@dataclass
class Budget:
    """Wall-clock budget of the run; sections end at fixed fractions of it from the start.

    ``clock`` is injectable so the logic is testable without waiting.
    """

    total_s: float
    clock: Callable[[], float] = time.monotonic
    start: float = field(default=0.0)

    def __post_init__(self) -> None:
        if self.total_s <= 0:
            raise ValueError(f"total_s must be > 0, got {self.total_s}")
        self.start = self.clock()

    def deadline(self, section: str) -> float:
        """Absolute clock time by which ``section`` must be done."""
        if section not in SECTION_ENDS:
            raise ValueError(f"section must be one of {sorted(SECTION_ENDS)}, got {section!r}")
        return self.start + SECTION_ENDS[section] * self.total_s

    def left(self, deadline: float) -> float:
        return deadline - self.clock()

    def allows(self, deadline: float, needed_s: float) -> bool:
        """Is there ``needed_s`` left before ``deadline``?"""
        return self.left(deadline) >= needed_s

    def elapsed(self) -> float:
        return self.clock() - self.start


# ------------------------------------------------------------------------------ correctness


class MismatchError(AssertionError):
    """Ours and the baseline disagree beyond the tolerance."""


TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 2e-3}


def compare_outputs(
    ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], dtype: torch.dtype,
) -> dict[str, float]:
    """Max |ours - reference| per tensor, scaled by max |reference| (or 1 if that is smaller).

    Raises MismatchError naming every tensor above the dtype's tolerance (bf16 outputs carry
    ~3 significant digits; both sides round differently). Returns the scaled errors.
    """
    if set(ours) != set(reference):
        raise ValueError(f"compare the same tensors: {sorted(ours)} vs {sorted(reference)}")
    tol = TOLERANCE.get(dtype, 3e-2)
    errors: dict[str, float] = {}
    bad = []
    for name in ours:
        a, b = ours[name].detach().float().cpu(), reference[name].detach().float().cpu()
        if a.shape != b.shape:
            raise MismatchError(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        if not torch.isfinite(a).all():
            bad.append(f"{name}: non-finite values")
            errors[name] = float("inf")
            continue
        scale = max(float(b.abs().max()) if b.numel() else 0.0, 1.0)
        err = float((a - b).abs().max()) / scale if a.numel() else 0.0
        errors[name] = err
        if err > tol:
            bad.append(f"{name}: max error {err:.3g} > {tol:.1g}")
    if bad:
        raise MismatchError("; ".join(bad))
    return errors


def attention_outputs(
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """out, dq, dk, dv of ``attend`` at these inputs (fresh leaves, so calls do not interact)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = attend(*leaves)
    grads = torch.autograd.grad(out, leaves, grad)
    return {"out": out.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}


def spion_attend(layout: Any, causal: bool, scale: float):
    """Our op (Triton on CUDA, the CPU kernel on CPU) as an ``attend(q, k, v)``."""
    from spion_fx.kernels.attention import block_sparse_attention_fwd

    seed = torch.zeros((), dtype=torch.int64)

    def attend(q, k, v):
        out, _ = block_sparse_attention_fwd(
            q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.q_num_blocks,
            layout.q_indices, layout.block_size, scale, causal, None, 0.0, seed, False,
        )
        return out

    return attend


def flex_attend(flex: Callable[..., torch.Tensor], block_mask: Any, scale: float):
    def attend(q, k, v):
        return flex(q, k, v, block_mask=block_mask, scale=scale)

    return attend


# ---------------------------------------------------------------------------------- timing


def cuda_time_ms(fn: Callable[[], object], reps: int = 15, batch_ms: float = 2.0) -> tuple[float, float]:
    """(median GPU ms per call, median host ms per call) of ``fn`` after a warm-up call.

    Calls run back to back in batches of about ``batch_ms`` between two CUDA events, so the
    GPU time is not padded by one synchronisation per call; when the host cannot enqueue work as
    fast as the GPU runs it, the host time per call says so.
    """
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    inner = max(1, min(200, int(batch_ms / once)))
    gpu, host = [], []
    for _ in range(reps):
        start.record()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        t1 = time.perf_counter()
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end) / inner)
        host.append((t1 - t0) * 1e3 / inner)
    return statistics.median(gpu), statistics.median(host)


def timers(
    attend: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    grad: torch.Tensor,
) -> tuple[Callable[[], object], Callable[[], object]]:
    """(forward without grad, forward + backward) of ``attend`` as argument-free callables."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]

    def forward() -> object:
        with torch.no_grad():
            return attend(q, k, v)

    def forward_backward() -> object:
        return torch.autograd.grad(attend(*leaves), leaves, grad)

    return forward, forward_backward


def first_call_ms(fn: Callable[[], object]) -> float:
    """Wall time of one call including synchronisation (a first call: compiles included)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


# ----------------------------------------------------------------------------- kernel grid


@dataclass(frozen=True)
class KernelGroup:
    """One shape (one Flex compile): head dim, length, pattern block, causal, densities."""

    head_dim: int
    length: int
    block: int
    causal: bool
    densities: tuple[float, ...]

    def label(self) -> str:
        mode = "causal" if self.causal else "non-causal"
        return f"D{self.head_dim} L={self.length} block {self.block} {mode}"


# Most important first: the headline rows (L=8192 and the L=2048 floor at D=64), then
# causal, D=128, longer and block-64 points. The section stops at its deadline.
KERNEL_GROUPS: tuple[KernelGroup, ...] = (
    KernelGroup(64, 8192, 128, False, (0.05, 0.10, 0.25)),
    KernelGroup(64, 2048, 128, False, (0.05, 0.10, 0.25)),
    KernelGroup(64, 8192, 128, True, (0.05, 0.10, 0.25)),
    KernelGroup(128, 8192, 128, False, (0.05, 0.10, 0.25)),
    KernelGroup(128, 2048, 128, True, (0.10, 0.25)),
    KernelGroup(64, 16384, 128, False, (0.05, 0.10)),
    KernelGroup(64, 8192, 64, False, (0.10,)),
    KernelGroup(64, 4096, 128, True, (0.10,)),
    KernelGroup(128, 16384, 128, True, (0.05, 0.10)),
    KernelGroup(64, 2048, 64, True, (0.10,)),
    KernelGroup(128, 4096, 128, False, (0.10,)),
)
# Seconds a new group needs at least (two Flex compiles, ours possibly compiling, the timings).
GROUP_NEEDS_S = 25.0
BATCH, HEADS = 1, 16


def _flex_compiled() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 128))
    return torch.compile(flex_attention, dynamic=False)


def kernel_rows(budget: Budget, deadline: float, log: Callable[[str], None]) -> tuple[list[dict], dict]:
    """Rows for the kernel grid, and raw measurements per point."""
    flex = _flex_compiled()
    rows: list[dict] = []
    raw: dict[str, Any] = {"points": [], "skipped": []}
    for group in KERNEL_GROUPS:
        if not budget.allows(deadline, GROUP_NEEDS_S):
            raw["skipped"].append(group.label())
            continue
        log(f"kernels: {group.label()} [{budget.elapsed():.0f}s]")
        try:
            rows += _kernel_group(group, flex, raw, budget, deadline)
        except Exception as exc:  # keep the suite going; the row says what broke
            rows.append(make_row(f"kernels {group.label()}", None, note=f"ERROR {exc!r}"[:300]))
            traceback.print_exc()
        torch.cuda.empty_cache()
    if raw["skipped"]:
        rows.append(make_row("kernel grid points not reached", None,
                             note="budget: " + "; ".join(raw["skipped"])))
    return rows, raw


def _kernel_group(group: KernelGroup, flex: Callable[..., torch.Tensor], raw: dict[str, Any],
                  budget: Budget, deadline: float) -> list[dict]:
    import torch.nn.functional as F
    from attention_gpu import spion_like_grid
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from spion_fx.kernels.attention.blockmask import layout_to_block_mask
    from spion_fx.kernels.attention.layout import BlockLayout

    dev, dtype = torch.device("cuda"), torch.bfloat16
    d, length, bs, causal = group.head_dim, group.length, group.block, group.causal
    scale = d ** -0.5
    gen = torch.Generator(device="cpu").manual_seed(length + d)
    q, k, v, g = (torch.randn(BATCH, HEADS, length, d, generator=gen).to(dev, dtype)
                  for _ in range(4))
    rows: list[dict] = []

    def dense(q_, k_, v_):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal, scale=scale)

    dense_f_ms, _ = cuda_time_ms(timers(dense, q, k, v, g)[0])
    dense_fb_ms, _ = cuda_time_ms(timers(dense, q, k, v, g)[1])
    nb = -(-length // bs)
    for density in group.densities:
        if not budget.allows(deadline, 3.0):
            raw["skipped"].append(f"{group.label()} {density:.0%}")
            continue
        grid = spion_like_grid(nb, density, seed=length + int(density * 100))
        tril = torch.ones(nb, nb, dtype=torch.bool).tril()
        if causal:  # a decoder's pattern holds no blocks right of the diagonal
            grid = grid & tril
        real = float(grid.sum()) / float(tril.sum() if causal else grid.numel())
        layout = BlockLayout.from_dense(grid, bs).to(dev)
        block_mask = layout_to_block_mask(layout, BATCH, HEADS, length, length, causal=causal,
                                          pattern_in_mask_mod=False)
        ours = spion_attend(layout, causal, scale)
        theirs = flex_attend(flex, block_mask, scale)
        ours_f, ours_fb = timers(ours, q, k, v, g)
        flex_f, flex_fb = timers(theirs, q, k, v, g)
        tag = f"D{d} L={length} bs{bs} {'causal' if causal else 'non-causal'} {real:.1%}"
        point: dict[str, Any] = {"head_dim": d, "length": length, "block": bs, "causal": causal,
                                 "density": real}

        # First calls of the group's shape: Flex compiles per shape; ours compiles once per kernel
        # variant (head dim, block, causal, tiles) and is warm when an earlier group shared it.
        if density == group.densities[0]:
            ours_first = first_call_ms(ours_fb) + first_call_ms(ours_f)
            flex_first = first_call_ms(flex_fb) + first_call_ms(flex_f)
            rows.append(make_row(
                f"first fwd+bwd and fwd calls (compile), {tag}", ours_first,
                "FlexAttention first calls", flex_first,
                note="ours: Triton JIT of fwd/dq/dkdv; Flex: fwd+bwd and fwd-only graphs",
            ))
            point["first_call_ms"] = {"ours": ours_first, "flex": flex_first}

        # Correctness before timing: a fast wrong kernel is worth nothing, so a mismatching
        # point keeps its figures (for diagnosis) but claims no target.
        mismatch = ""
        try:
            point["max_scaled_error_vs_flex"] = compare_outputs(
                attention_outputs(ours, q, k, v, g), attention_outputs(theirs, q, k, v, g), dtype)
        except MismatchError as exc:
            mismatch = f"MISMATCH vs Flex ({exc}); "
            point["mismatch"] = str(exc)

        of, of_host = cuda_time_ms(ours_f)
        ff, _ = cuda_time_ms(flex_f)
        ofb, ofb_host = cuda_time_ms(ours_fb)
        ffb, _ = cuda_time_ms(flex_fb)
        point.update({"ours_fwd_ms": of, "ours_fwd_host_ms": of_host, "flex_fwd_ms": ff,
                      "ours_fb_ms": ofb, "ours_fb_host_ms": ofb_host, "flex_fb_ms": ffb,
                      "dense_fwd_ms": dense_f_ms, "dense_fb_ms": dense_fb_ms})
        raw["points"].append(point)
        headline = length == 8192 and not causal and abs(density - 0.10) < 1e-9
        targets = ("", "", "") if mismatch else (">= 1.0x", ">= 1.2x", ">= 8x" if headline else "")
        rows.append(make_row(f"fwd {tag}", of, "FlexAttention fwd", ff, targets[0],
                             f"{mismatch}host {of_host:.3f} ms/call"))
        rows.append(make_row(f"fwd+bwd {tag}", ofb, "FlexAttention fwd+bwd", ffb, targets[1],
                             f"{mismatch}host {ofb_host:.3f} ms/call"))
        rows.append(make_row(f"fwd+bwd {tag}", ofb, "dense flash SDPA fwd+bwd", dense_fb_ms,
                             targets[2], mismatch.rstrip("; ")))
    return rows


# ---------------------------------------------------------------------------------- GPT-2


@dataclass(frozen=True)
class GPT2Setup:
    """The issue's GPT-2 rows. ``device``/``compile_backend``/``sparsify_inner`` exist so the
    same code can be smoke-tested on CPU at a tiny size; the suite uses the defaults."""

    seq_len: int = 8192
    batch: int = 2
    layers: int = 6
    width: int = 768
    heads: int = 12
    vocab: int = 256
    lr: float = 3e-4
    warmup: int = 2
    reps: int = 6
    block_size: int = 128
    device: str = "cuda"
    compile_backend: str = "inductor"
    sparsify_inner: str | None = None


def _gpt2(setup: GPT2Setup) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=setup.vocab, n_positions=setup.seq_len, n_embd=setup.width,
        n_layer=setup.layers, n_head=setup.heads, use_cache=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).to(setup.device).train()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step(model, opt, batch, device: str) -> float:
    """One training step, synchronised; returns its wall time in seconds."""
    x = batch[0].to(device, non_blocking=True)
    _sync(device)
    t0 = time.perf_counter()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - t0
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value}")
    return seconds


def _steady(model, opt, sampler, setup: GPT2Setup) -> tuple[float, float]:
    """(median step ms, peak GiB; NaN off CUDA) over setup.reps steps after setup.warmup steps."""
    for _ in range(setup.warmup):
        _step(model, opt, next(sampler), setup.device)
    cuda = setup.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [_step(model, opt, next(sampler), setup.device) for _ in range(setup.reps)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return statistics.median(times) * 1e3, peak


def _free() -> None:
    # Callers drop their references first; this returns the memory before the next variant.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sites(model) -> list:
    return list(model.spion_state.attention_sites())


def _pattern_density(model) -> tuple[float, float]:
    """(mean block density over the grid, mean density over the causal triangle)."""
    grid, causal = [], []
    for site in _sites(model):
        pattern = site.pattern.bool().cpu()
        n = pattern.shape[-1]
        tril = torch.ones(n, n, dtype=torch.bool).tril()
        grid.append(float(pattern.float().mean()))
        causal.append(float((pattern & tril).sum()) / (float(tril.sum()) * pattern.shape[0]))
    if not grid:
        return float("nan"), float("nan")
    return statistics.mean(grid), statistics.mean(causal)


def gpt2_rows(budget: Budget, deadline: float, log: Callable[[str], None],
              setup: GPT2Setup | None = None,
              progress: Callable[[list[dict], dict], None] | None = None,
              ) -> tuple[list[dict], dict]:
    """The GPT-2 rows: eager, sparsify (dense phase, switch, sparse phase), torch.compile.

    sparsify runs before torch.compile: its rows are the issue's targets, torch.compile is a
    reference. ``progress(rows, raw)`` is called after each variant, so a run stopped midway
    keeps what it measured.
    """
    from spion_fx.data import BatchSampler, load_corpus

    setup = setup or GPT2Setup()
    data = load_corpus().train
    raw: dict[str, Any] = {"setup": dataclasses.asdict(setup)}
    rows: list[dict] = []

    def report() -> None:
        if progress is not None:
            progress(rows, raw)

    def sampler():
        return BatchSampler(data, setup.batch, setup.seq_len, seed=0)

    def optimizer(model):
        return torch.optim.AdamW(model.parameters(), lr=setup.lr, fused=True)

    def step(model, opt, batches) -> float:
        return _step(model, opt, next(batches), setup.device) * 1e3

    # eager
    log(f"gpt2: eager [{budget.elapsed():.0f}s]")
    model = _gpt2(setup)
    opt = optimizer(model)
    batches = sampler()
    eager_first = step(model, opt, batches)
    eager_ms, eager_gib = _steady(model, opt, batches, setup)
    raw["eager"] = {"first_ms": eager_first, "step_ms": eager_ms, "peak_gib": eager_gib}
    rows.append(make_row("GPT-2 step, eager HF", eager_ms, note=f"peak {eager_gib:.2f} GiB"))
    model = opt = None
    _free()
    report()

    # sparsify: dense phase, the switch, sparse phase
    if budget.allows(deadline, 60):
        log(f"gpt2: sparsify [{budget.elapsed():.0f}s]")
        rows += _sparsify_rows(setup, sampler, optimizer, step, eager_ms, eager_gib, raw)
        torch._dynamo.reset()
        _free()
    else:
        rows.append(make_row("GPT-2 sparsify rows", None, note="skipped: budget"))
    report()

    # torch.compile
    if budget.allows(deadline, 90):
        log(f"gpt2: torch.compile [{budget.elapsed():.0f}s]")
        model = _gpt2(setup)
        opt = optimizer(model)
        compiled = torch.compile(model, backend=setup.compile_backend)
        batches = sampler()
        first = step(compiled, opt, batches)
        ms, gib = _steady(compiled, opt, batches, setup)
        raw["compile"] = {"first_ms": first, "step_ms": ms, "peak_gib": gib}
        rows.append(make_row("GPT-2 step, torch.compile", ms, "eager HF", eager_ms,
                             note=f"peak {gib:.2f} GiB; first step (compile) {first / 1e3:.1f} s"))
        model = opt = compiled = None
        torch._dynamo.reset()
        _free()
    else:
        rows.append(make_row("GPT-2 step, torch.compile", None, note="skipped: budget"))
    report()
    return rows, raw


def _sparsify_rows(setup: GPT2Setup, sampler, optimizer, step, eager_ms: float,
                   eager_gib: float, raw: dict[str, Any]) -> list[dict]:
    import spion_fx

    rows: list[dict] = []
    model = _gpt2(setup)
    opt = optimizer(model)
    dense_steps = 1 + setup.warmup + setup.reps + 1  # compile, warm-up, timed, the probe/switch
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, inner=setup.sparsify_inner,
                      block_size=setup.block_size, probe_interval=10**6, min_dense_steps=0,
                      max_dense_steps=dense_steps)
    batches = sampler()
    first = step(model, opt, batches)
    dense_ms, dense_gib = _steady(model, opt, batches, setup)
    raw["sparsify"] = {"first_ms": first, "dense_ms": dense_ms, "dense_peak_gib": dense_gib}
    if any(s.phase == "sparse" for s in _sites(model)):
        return [make_row("GPT-2 sparsify rows", None, note="the switch came during the timed "
                         "dense steps; no dense/switch figures")]
    rows.append(make_row("GPT-2 step, sparsify dense phase", dense_ms, "eager HF", eager_ms,
                         ">= 1.0x", f"peak {dense_gib:.2f} GiB; first step (compile) "
                         f"{first / 1e3:.1f} s"))
    # Steps until the switch has happened: the step in which the phase flips, then one more.
    switch_ms: list[float] = []
    for _ in range(4):
        was_sparse = any(s.phase == "sparse" for s in _sites(model))
        switch_ms.append(step(model, opt, batches))
        if was_sparse:
            break
    raw["sparsify"]["switch_steps_ms"] = switch_ms
    if not (_sites(model) and all(s.phase == "sparse" for s in _sites(model))):
        rows.append(make_row("GPT-2 switch", None, note=f"no switch after {dense_steps} steps; "
                             f"phases {[s.phase for s in _sites(model)]}"))
        return rows
    sparse_ms, sparse_gib = _steady(model, opt, batches, setup)
    grid_density, causal_density = _pattern_density(model)
    # The stall: the step during which the phase flipped and the step after it, beyond two
    # steady sparse steps. (Whether the flipping step's own forward ran dense or already sparse
    # depends on where the policy decides; if dense, this overstates the stall by one
    # dense-minus-sparse step -- tens of ms against a target in seconds.)
    stall_ms = switch_ms[-2] + switch_ms[-1] - 2 * sparse_ms
    rows.append(make_row("GPT-2 switch stall (switch step + first sparse step beyond steady)",
                         stall_ms, target="<= 15 s",
                         note=f"steps around the switch: {', '.join(f'{t / 1e3:.1f}' for t in switch_ms)} s"))
    rows.append(make_row("GPT-2 step, sparsify sparse phase", sparse_ms, "eager HF (dense)",
                         eager_ms, ">= 2.5x",
                         f"causal density {causal_density:.1%} (grid {grid_density:.1%}); peak "
                         f"{sparse_gib:.2f} GiB vs eager {eager_gib:.2f} GiB"))
    raw["sparsify"].update({"stall_ms": stall_ms, "sparse_ms": sparse_ms,
                            "sparse_peak_gib": sparse_gib, "grid_density": grid_density,
                            "causal_density": causal_density})
    return rows


# ------------------------------------------------------------------------------------- N:M


def nm_rows(deadline: float, log: Callable[[str], None]) -> list[dict]:
    """Rows of benchmarks/gpu_nm.py (``gpu_rows(deadline)``, deadline on time.monotonic())."""
    if importlib.util.find_spec("gpu_nm") is None:
        return []
    import gpu_nm

    log("nm: gpu_nm.gpu_rows")
    return [{key: row.get(key) for key in ROW_KEYS} for row in gpu_nm.gpu_rows(deadline)]


# ----------------------------------------------------------------------------------- report


def environment() -> dict[str, Any]:
    import triton

    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = "not installed"
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": hf,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def section_markdown(env: dict[str, Any], sections: dict[str, list[dict]], seconds: float) -> str:
    lines = [
        "## GPU",
        "",
        f"Measured {env['date']} with `make bench-gpu` (`benchmarks/gpu_suite.py`), "
        f"{seconds:.0f} s in all.",
        "",
        f"- GPU: {env['device']} ({env['sms']} SMs, {env['memory_gib']} GiB, compute capability "
        f"{env['capability']})",
        f"- torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, transformers "
        f"{env['transformers']}, Python {env['python']}",
        "- Kernel rows: B=1, H=16, bf16, SPION-like patterns; ours = the `spion::block_sparse_"
        "attention` op (Triton), checked against FlexAttention (same block mask, "
        "`torch.compile`) before timing; medians of CUDA-event timings of back-to-back calls. "
        "ratio = baseline / ours (> 1: ours faster); `met` compares with the issue's target.",
        "- GPT-2 rows: 6 layers, d768, 12 heads, L=8192, B=2, bf16 autocast, fused AdamW, "
        "clipping, default dropouts; median step time after warm-up.",
        "",
    ]
    titles = {"kernels": "### Block-sparse attention kernels", "gpt2": "### HF GPT-2 training step",
              "nm": "### N:M linear"}
    for name, rows in sections.items():
        if not rows:
            continue
        lines += [titles.get(name, f"### {name}"), "", rows_table(rows)]
    return "\n".join(lines)


def _out_dir() -> Path:
    out = Path(os.environ.get("OUT") or ROOT / "out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _save(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")


class Stopped(BaseException):
    """SIGTERM (the caller's timeout): stop measuring, write what was measured."""


def _stop_on_sigterm() -> None:
    def handler(signum, frame):
        raise Stopped()

    signal.signal(signal.SIGTERM, handler)


def run_suite(budget_s: float, write: bool, benchmarks_md: Path) -> int:
    budget = Budget(budget_s)

    def log(message: str) -> None:
        print(message, flush=True)

    env = environment()
    log(f"{env['device']}: torch {env['torch']}, triton {env['triton']}, transformers "
        f"{env['transformers']}; budget {budget_s:.0f} s")
    json_path = _out_dir() / "gpu_suite.json"
    sections: dict[str, list[dict]] = {}
    payload: dict[str, Any] = {"environment": env, "budget_s": budget_s, "sections": sections,
                               "raw": {}}

    def save(final: bool = False) -> None:
        """JSON and the BENCHMARKS.md section, after every measurement group."""
        payload["elapsed_s"] = budget.elapsed()
        payload["complete"] = final
        _save(json_path, payload)
        if write:
            text = benchmarks_md.read_text(encoding="utf-8") if benchmarks_md.exists() else ""
            body = section_markdown(env, sections, budget.elapsed())
            if not final:
                body += "\n_Partial: the run stopped before every section had finished._\n"
            benchmarks_md.write_text(rewrite_section(text, body), encoding="utf-8")

    def gpt2_progress(rows: list[dict], raw: dict) -> None:
        sections["gpt2"], payload["raw"]["gpt2"] = list(rows), raw
        save()

    steps: list[tuple[str, Callable[[], tuple[list[dict], Any]]]] = [
        ("kernels", lambda: kernel_rows(budget, budget.deadline("kernels"), log)),
        ("gpt2", lambda: gpt2_rows(budget, budget.deadline("gpt2"), log,
                                   progress=gpt2_progress)),
        ("nm", lambda: (nm_rows(budget.deadline("nm"), log), None)),
    ]
    _stop_on_sigterm()
    stopped = False
    for name, step in steps:
        try:
            rows, raw = step()
        except Stopped:
            log(f"stopped by SIGTERM during {name} ({budget.elapsed():.0f} s)")
            sections.setdefault(name, []).append(
                make_row(f"{name} section", None, note="stopped by the caller's timeout"))
            stopped = True
            break
        except Exception as exc:
            traceback.print_exc()
            rows, raw = [make_row(f"{name} section", None, note=f"ERROR {exc!r}"[:300])], None
        sections[name] = rows
        payload["raw"][name] = raw
        save()
        print(rows_table(rows), flush=True)
    save(final=not stopped)
    log(f"results: {json_path} ({budget.elapsed():.0f} s)")
    if write:
        log(f"rewrote the GPU section of {benchmarks_md}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="wall-clock budget of the whole run (default %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument("--benchmarks-md", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NEEDS_CUDA)
        return 0
    return run_suite(args.budget_s, not args.no_write, args.benchmarks_md)


if __name__ == "__main__":
    sys.exit(main())
