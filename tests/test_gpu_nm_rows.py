"""benchmarks/gpu_nm.py on CPU: no rows without CUDA, and the row-building paths (correctness
gate, ratios, deadline, the training-step checks) on tiny shapes with the Triton interpreter."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first decorated

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_nm  # noqa: E402

from spion_fx.kernels.nm import triton_nm  # noqa: E402

KEYS = {"what", "ours_ms", "baseline", "baseline_ms", "ratio", "target", "note"}
needs_triton = pytest.mark.skipif(not (triton_nm.available() and triton_nm.interpreting()),
                                  reason="needs triton with TRITON_INTERPRET=1")


def _fake_timer(table):
    def timer(fn, copies):
        fn(copies - 1)  # every kernel must run on the timing input
        return table.pop(0)

    return timer


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_gpu_rows_without_cuda_is_empty_and_immediate():
    start = time.perf_counter()
    assert gpu_nm.gpu_rows(time.perf_counter() + 600) == []
    assert time.perf_counter() - start < 1.0


@needs_triton
def test_decode_rows_on_cpu(monkeypatch):
    monkeypatch.setattr(gpu_nm, "GEMV_SWEEP", ((16, 4), (32, 2)))
    # per (shape, tokens): dense, default GEMV; then the sweep: dense, two tiles
    times = [2.0, 1.0, 2.0, 4.0, 0.5,
             2.0, 4.0, 2.0, 1.0, 3.0,
             3.0, 1.5, 3.0, 3.0, 3.0,
             3.0, 1.0, 3.0, 6.0, 6.0]
    rows = gpu_nm.decode_rows(time.perf_counter() + 600, device="cpu", weights_shapes=((24, 32), (8, 48)),
                              tokens_list=(1, 5), patterns=((1, 8),), timer=_fake_timer(times),
                              dtype=torch.float32)
    assert len(rows) == 8 and all(set(r) == KEYS for r in rows)
    main, sweep = rows[0::2], rows[1::2]
    assert [r["ratio"] for r in main] == [2.0, 0.5, 2.0, 3.0]
    assert main[0]["what"] == "decode N:M 1:8 T=1 W[24x32] float32 triton GEMV"
    assert main[0]["target"] == ">= 1.5" and "cpu" in main[0]["note"]
    assert [r["ratio"] for r in sweep] == [4.0, 2.0, 1.0, 0.5]  # the faster tile of each pair
    assert "best of sweep, BLOCK_K=32 BLOCK_O=2" in sweep[0]["what"]


@needs_triton
def test_prefill_rows_on_cpu_include_the_finalize_pick():
    rows = gpu_nm.prefill_rows(time.perf_counter() + 600, device="cpu", shape=(70, 32, 16), patterns=((2, 4),),
                               timer=_fake_timer([1.0, 4.0]), dtype=torch.float32)
    assert [r["what"].split("]ᵀ float32 ")[1] for r in rows[:1]] == ["triton packed"]
    assert rows[0]["ratio"] == 0.25  # no semi-structured kernel on CPU: only Triton is listed
    pick = rows[1]
    assert "finalize(mode=speed) picks" in pick["what"] and pick["ratio"] >= 1.0  # never slower
    assert set(pick) == KEYS


def test_wrong_or_failing_kernel_gets_a_row_without_a_time():
    weights = gpu_nm._Weights(16, 32, 2, 4, torch.float32, "cpu", copies=1)
    x = torch.randn(3, 32)

    def broken(i):
        raise RuntimeError("library says no")

    kernels = {"off": lambda i: torch.nn.functional.linear(x, weights.dense[i]) * 1.5, "broken": broken}
    rows = gpu_nm._kernel_rows("t", x, weights, kernels, _fake_timer([2.0]), 1, ">= 1", "cpu")
    assert [math.isnan(r["ours_ms"]) for r in rows] == [True, True]
    assert "differs" in rows[0]["note"] and "library says no" in rows[1]["note"]
    assert rows[0]["baseline_ms"] == 2.0


def test_deadline_in_the_past_gives_no_rows():
    assert gpu_nm.decode_rows(time.perf_counter() - 1, device="cpu") == []
    assert gpu_nm.prefill_rows(time.perf_counter() - 1, device="cpu") == []


def test_train_step_rows_on_cpu(monkeypatch):
    pytest.importorskip("transformers")
    import nm_linear

    # two of the variants keep it short: dense and SR-STE with masks every step
    monkeypatch.setattr(nm_linear, "STEP_VARIANTS", nm_linear.STEP_VARIANTS[:2])
    rows = gpu_nm.train_step_rows(time.perf_counter() + 600, device="cpu", reps=1, config=(32, 1, 4, 16),
                                  batch=1, inner="eager", warmup=1)
    assert len(rows) == 1 and all(set(r) == KEYS for r in rows)
    assert all(r["ours_ms"] > 0 and r["baseline_ms"] > 0 and "masks 2:4" in r["note"] for r in rows)


def test_mask_rows_on_cpu():
    rows = gpu_nm.mask_rows(time.perf_counter() + 600, device="cpu", shapes=((8, 16),),
                            timer=_fake_timer([1.0, 3.0]))
    assert len(rows) == 1 and set(rows[0]) == KEYS and rows[0]["ratio"] == 3.0


def test_gpu_rows_runs_what_fits_and_survives_a_failing_section(monkeypatch):
    ran = []

    def section(name, fail=False):
        def run(deadline):
            ran.append(name)
            if fail:
                raise RuntimeError("boom")
            return [{"what": name}]
        return run

    plan = [(section("decode"), 0.0), (section("prefill", fail=True), 1.0), (section("mask"), 2.0),
            (section("train"), 1e6)]
    monkeypatch.setattr(gpu_nm, "_plan", lambda: plan)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rows = gpu_nm.gpu_rows(time.perf_counter() + 60)
    assert ran == ["decode", "prefill", "mask"]  # train needs more time than is left
    assert [r["what"] for r in rows] == ["decode", "mask"]
    ran.clear()
    assert gpu_nm.gpu_rows(time.perf_counter() - 1) == [] and ran == []


def test_plan_puts_the_telling_rows_first():
    plan = gpu_nm._plan()
    assert plan[-1] == (gpu_nm.train_step_rows, 240.0)
    assert plan[0][1] == 0.0 and all(need >= 0 for _, need in plan)
