"""benchmarks/gpu_suite.py without a GPU: the CUDA check, and its pure parts.

The suite itself needs CUDA; here it must say so and leave BENCHMARKS.md alone. Its row
formatting, target checks, section rewriting, budget and correctness check are plain Python and
run anywhere; the check is exercised on the Triton kernels under the interpreter.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the suite would run")
def test_without_cuda_says_so_and_exits_0():
    md = ROOT / "BENCHMARKS.md"
    before = hashlib.sha256(md.read_bytes()).hexdigest()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py")], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "needs CUDA" in result.stdout
    assert "BENCHMARKS.md is unchanged" in result.stdout
    assert hashlib.sha256(md.read_bytes()).hexdigest() == before


def test_main_returns_0_without_cuda(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    md = tmp_path / "B.md"
    md.write_text("keep me\n")
    assert gpu_suite.main(["--benchmarks-md", str(md)]) == 0
    assert "needs CUDA" in capsys.readouterr().out
    assert md.read_text() == "keep me\n"


# ---------------------------------------------------------------------------------- rows


def test_make_row_shape_and_ratio():
    row = gpu_suite.make_row("fwd", 0.5, "Flex", 0.75, ">= 1.0x", "n")
    assert tuple(row) == gpu_suite.ROW_KEYS
    assert row["ratio"] == pytest.approx(1.5)
    assert gpu_suite.make_row("x", None, "b", 1.0)["ratio"] is None
    assert gpu_suite.make_row("x", 0.0, "b", 1.0)["ratio"] is None
    assert gpu_suite.make_row("x", 2.0)["ratio"] is None


@pytest.mark.parametrize("target, ours, base, met", [
    (">= 1.0x", 1.0, 0.9, False),
    (">= 1.0x", 0.9, 0.9, True),
    ("≥ 1.2×", 0.5, 0.61, True),
    ("≥ 1.2×", 0.5, 0.59, False),
    (">= 8x", 0.42, 3.36, True),
    ("<= 15 s", 14_000.0, None, True),
    ("≤ 15 s", 16_000.0, None, False),
    ("", 1.0, 2.0, None),
    ("faster", 1.0, 2.0, None),
    (">= 1.0x", None, 2.0, None),
    ("<= 15 s", None, None, None),
    (">= abc x", 1.0, 2.0, None),
])
def test_target_met(target, ours, base, met):
    assert gpu_suite.target_met(gpu_suite.make_row("r", ours, "b", base, target)) is met


def test_rows_table():
    rows = [gpu_suite.make_row("fwd | D64", 0.09, "Flex", 0.087, ">= 1.0x", "host 0.02"),
            gpu_suite.make_row("stall", 12_345.0, target="<= 15 s"),
            gpu_suite.make_row("skipped", None, note="budget")]
    table = gpu_suite.rows_table(rows).splitlines()
    assert table[0].startswith("| what | ours ms | baseline | baseline ms | ratio | target | met")
    assert len(table) == 2 + len(rows)
    assert "fwd \\| D64" in table[2] and "| 0.967 |" in table[2] and "**no**" in table[2]
    assert "| 12345 |" in table[3] and "| yes |" in table[3]
    assert table[4].count("|") == table[0].count("|")


# ---------------------------------------------------------------------------- BENCHMARKS.md


def test_rewrite_section_replaces_only_between_markers():
    b, e = gpu_suite.BEGIN_MARKER, gpu_suite.END_MARKER
    text = f"# T\n\n<!-- cpu:begin -->\ncpu\n<!-- cpu:end -->\n\n{b}\nold\n{e}\n\ntrailer\n"
    new = gpu_suite.rewrite_section(text, "## GPU\nnew figures\n")
    assert new == f"# T\n\n<!-- cpu:begin -->\ncpu\n<!-- cpu:end -->\n\n{b}\n## GPU\nnew figures\n{e}\n\ntrailer\n"
    assert gpu_suite.rewrite_section(new, "## GPU\nnew figures\n") == new  # idempotent


def test_rewrite_section_appends_when_absent_and_refuses_half_markers():
    new = gpu_suite.rewrite_section("# T\n", "body")
    assert new == f"# T\n\n{gpu_suite.BEGIN_MARKER}\nbody\n{gpu_suite.END_MARKER}\n"
    with pytest.raises(ValueError, match="no matching"):
        gpu_suite.rewrite_section(f"x\n{gpu_suite.BEGIN_MARKER}\nold\n", "body")


def test_benchmarks_md_has_one_gpu_section():
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert text.count(gpu_suite.BEGIN_MARKER) == 1 and text.count(gpu_suite.END_MARKER) == 1
    assert text.index(gpu_suite.BEGIN_MARKER) < text.index(gpu_suite.END_MARKER)


ENV = {"date": "2026-01-01 00:00 UTC", "device": "NVIDIA H200", "sms": 132, "memory_gib": 139.8,
       "capability": "9.0", "torch": "2.11.0", "cuda": "12.8", "triton": "3.6.0",
       "transformers": "5.17.0", "python": "3.12.0"}


def test_section_markdown_names_device_and_versions():
    md = gpu_suite.section_markdown(ENV, {"kernels": [gpu_suite.make_row("fwd", 1.0, "Flex", 1.1)],
                                          "gpt2": [], "nm": []}, 300.0)
    for needle in ("## GPU", "NVIDIA H200", "torch 2.11.0", "triton 3.6.0", "transformers 5.17.0",
                   "2026-01-01", "### Block-sparse attention kernels"):
        assert needle in md
    assert "### HF GPT-2" not in md  # empty sections are left out


# ---------------------------------------------------------------------------------- budget


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_deadlines_and_allowance():
    clock = FakeClock()
    budget = gpu_suite.Budget(300.0, clock=clock)
    ends = [budget.deadline(s) for s in ("kernels", "gpt2", "nm")]
    assert ends == sorted(ends) and ends[0] > 1000.0 and ends[-1] <= 1300.0
    kernels = budget.deadline("kernels")
    assert budget.allows(kernels, gpu_suite.GROUP_NEEDS_S)
    clock.now = kernels - gpu_suite.GROUP_NEEDS_S + 1
    assert not budget.allows(kernels, gpu_suite.GROUP_NEEDS_S)
    assert budget.allows(budget.deadline("gpt2"), 60)
    assert budget.elapsed() == pytest.approx(kernels - gpu_suite.GROUP_NEEDS_S + 1 - 1000.0)
    with pytest.raises(ValueError, match="section"):
        budget.deadline("dinner")
    with pytest.raises(ValueError, match="total_s"):
        gpu_suite.Budget(0)


def test_budget_fits_six_minutes():
    # The default budget and every section's end leave the run inside ~6 minutes.
    assert gpu_suite.DEFAULT_BUDGET_S <= 360
    assert all(0 < f <= 1 for f in gpu_suite.SECTION_ENDS.values())
    assert sorted(gpu_suite.SECTION_ENDS.values()) == list(gpu_suite.SECTION_ENDS.values())


def test_kernel_grid_leads_with_the_issue_rows():
    first = gpu_suite.KERNEL_GROUPS[0]
    assert (first.head_dim, first.length, first.block, first.causal) == (64, 8192, 128, False)
    assert set(first.densities) == {0.05, 0.10, 0.25}
    shapes = {(g.head_dim, g.length, g.block, g.causal) for g in gpu_suite.KERNEL_GROUPS}
    assert (64, 2048, 128, False) in shapes and any(g.block == 64 for g in gpu_suite.KERNEL_GROUPS)
    assert {g.head_dim for g in gpu_suite.KERNEL_GROUPS} == {64, 128}
    assert {g.causal for g in gpu_suite.KERNEL_GROUPS} == {False, True}


# ----------------------------------------------------------------------------- correctness


def test_compare_outputs_passes_and_fails():
    torch.manual_seed(0)
    ref = {"out": torch.randn(2, 8), "dq": torch.randn(2, 8) * 10}
    same = {n: t.clone() for n, t in ref.items()}
    errors = gpu_suite.compare_outputs(same, ref, torch.bfloat16)
    assert errors == {"out": 0.0, "dq": 0.0}
    # within bf16 rounding: passes
    close = {n: t.bfloat16().float() for n, t in ref.items()}
    gpu_suite.compare_outputs(close, ref, torch.bfloat16)
    wrong = {"out": ref["out"].clone(), "dq": ref["dq"].clone()}
    wrong["dq"][1, 3] += 5.0
    with pytest.raises(gpu_suite.MismatchError, match="dq"):
        gpu_suite.compare_outputs(wrong, ref, torch.bfloat16)
    nan = {"out": ref["out"].clone(), "dq": ref["dq"].clone()}
    nan["out"][0, 0] = float("nan")
    with pytest.raises(gpu_suite.MismatchError, match="non-finite"):
        gpu_suite.compare_outputs(nan, ref, torch.float32)
    with pytest.raises(gpu_suite.MismatchError, match="shape"):
        gpu_suite.compare_outputs({"out": ref["out"][:1], "dq": ref["dq"]}, ref, torch.float32)
    with pytest.raises(ValueError, match="same tensors"):
        gpu_suite.compare_outputs({"out": ref["out"]}, ref, torch.float32)


class _TritonAttention(torch.autograd.Function):
    """The Triton launchers (interpreter on CPU) behind autograd, as the op is on CUDA."""

    @staticmethod
    def forward(ctx, q, k, v, layout, causal, scale):
        from spion_fx.kernels.attention.triton_attention import triton_block_sparse_fwd

        ctx.args = (layout.kv_num_blocks, layout.kv_indices, layout.q_num_blocks,
                    layout.q_indices, layout.block_size, scale, causal, None, 0.0,
                    torch.zeros((), dtype=torch.int64), False)
        out, lse = triton_block_sparse_fwd(q, k, v, *ctx.args)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        from spion_fx.kernels.attention.triton_attention import triton_block_sparse_bwd

        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = triton_block_sparse_bwd(grad.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None


def _interpreted_triton():
    if torch.cuda.is_available():
        pytest.skip("checks the interpreter; on CUDA the suite itself runs this check")
    triton_attention = pytest.importorskip("spion_fx.kernels.attention.triton_attention")
    if not triton_attention.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("causal", [False, True])
def test_check_on_triton_interpreter_against_flex_and_reference(causal):
    """The suite's check, end to end on CPU: ours (Triton, interpreted) vs FlexAttention (eager,
    with the same block-mask conversion) on the forward, vs the float64 reference on gradients
    (FlexAttention has no CPU backward); and a wrong layout must fail it."""
    _interpreted_triton()
    from torch.nn.attention.flex_attention import flex_attention

    from spion_fx.kernels.attention.blockmask import layout_to_block_mask
    from spion_fx.kernels.attention.layout import BlockLayout
    from spion_fx.kernels.attention.reference import reference_attention

    torch.manual_seed(0)
    b, h, length, d, bs = 1, 2, 64, 16, 16
    q, k, v, g = (torch.randn(b, h, length, d) for _ in range(4))
    grid = (torch.rand(4, 4) < 0.4) | torch.eye(4, dtype=torch.bool)
    layout = BlockLayout.from_dense(grid, bs)
    scale = d ** -0.5

    def ours(q_, k_, v_):
        return _TritonAttention.apply(q_, k_, v_, layout, causal, scale)

    block_mask = layout_to_block_mask(layout, b, h, length, length, causal=causal)
    with torch.no_grad():
        flex_out = flex_attention(q, k, v, block_mask=block_mask, scale=scale)
        gpu_suite.compare_outputs({"out": ours(q, k, v)}, {"out": flex_out}, torch.float32)

    def reference(q_, k_, v_):
        return reference_attention(q_.double(), k_.double(), v_.double(), layout, scale, causal)[0]

    got = gpu_suite.attention_outputs(ours, q, k, v, g)
    want = gpu_suite.attention_outputs(reference, q, k, v, g.double())
    errors = gpu_suite.compare_outputs(got, want, torch.float32)
    assert set(errors) == {"out", "dq", "dk", "dv"} and max(errors.values()) < 1e-3

    other = BlockLayout.from_dense(grid | torch.ones(4, 4, dtype=torch.bool), bs)
    wrong = gpu_suite.attention_outputs(
        lambda q_, k_, v_: _TritonAttention.apply(q_, k_, v_, other, causal, scale), q, k, v, g)
    with pytest.raises(gpu_suite.MismatchError):
        gpu_suite.compare_outputs(wrong, want, torch.float32)


def test_spion_attend_runs_the_op_on_cpu():
    from spion_fx.kernels.attention.layout import BlockLayout
    from spion_fx.kernels.attention.reference import reference_attention

    torch.manual_seed(1)
    q, k, v, g = (torch.randn(1, 2, 32, 8) for _ in range(4))
    layout = BlockLayout.from_dense(torch.eye(2, dtype=torch.bool), 16)
    got = gpu_suite.attention_outputs(gpu_suite.spion_attend(layout, True, 0.3), q, k, v, g)

    def reference(q_, k_, v_):
        return reference_attention(q_.double(), k_.double(), v_.double(), layout, 0.3, True)[0]

    gpu_suite.compare_outputs(got, gpu_suite.attention_outputs(reference, q, k, v, g.double()),
                              torch.float32)
    assert math.isfinite(float(got["dq"].abs().sum()))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gpt2_rows_smoke_on_cpu():
    """The GPT-2 section's own code (not its figures) at a tiny size on CPU: every row present,
    the switch found between the dense and the sparse steps."""
    pytest.importorskip("transformers")
    setup = gpu_suite.GPT2Setup(seq_len=64, batch=2, layers=1, width=32, heads=2, block_size=16,
                                warmup=1, reps=1, device="cpu", compile_backend="eager",
                                sparsify_inner="aot_eager")
    budget = gpu_suite.Budget(10_000.0)
    seen: list[int] = []
    rows, raw = gpu_suite.gpt2_rows(budget, budget.deadline("gpt2"), lambda _: None, setup,
                                    progress=lambda rows, raw: seen.append(len(rows)))
    names = [r["what"] for r in rows]
    assert names[0] == "GPT-2 step, eager HF" and names[-1] == "GPT-2 step, torch.compile"
    assert names[1] == "GPT-2 step, sparsify dense phase", names
    assert names[2].startswith("GPT-2 switch stall"), names
    assert seen == [1, 4, 5]  # progress after each variant: partial results survive a timeout
    sparse = next(r for r in rows if r["what"] == "GPT-2 step, sparsify sparse phase")
    assert sparse["ratio"] is not None and sparse["target"] == ">= 2.5x"
    assert 0 < raw["sparsify"]["grid_density"] < 1
    assert len(raw["sparsify"]["switch_steps_ms"]) >= 2
    assert all(math.isfinite(r["ours_ms"]) for r in rows if r["ours_ms"] is not None)


def test_gpt2_rows_skip_what_the_budget_cannot_hold():
    pytest.importorskip("transformers")
    clock = FakeClock()
    budget = gpu_suite.Budget(50.0, clock=clock)  # GPT-2 gets 44 s: too little for compiles
    setup = gpu_suite.GPT2Setup(seq_len=32, batch=1, layers=1, width=16, heads=2, block_size=16,
                                warmup=0, reps=1, device="cpu")
    rows, _ = gpu_suite.gpt2_rows(budget, budget.deadline("gpt2"), lambda _: None, setup)
    assert [r["note"] for r in rows[1:]] == ["skipped: budget", "skipped: budget"]


def test_run_suite_keeps_partial_results_when_stopped(monkeypatch, tmp_path):
    """A timeout (SIGTERM -> Stopped) mid-GPT-2 still leaves the JSON and the BENCHMARKS.md
    section with everything measured so far, marked partial; the rest of the file is kept."""
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    monkeypatch.setattr(gpu_suite, "environment", lambda: ENV)
    monkeypatch.setattr(gpu_suite, "_stop_on_sigterm", lambda: None)
    monkeypatch.setattr(gpu_suite, "kernel_rows", lambda budget, deadline, log: (
        [gpu_suite.make_row("fwd D64", 0.09, "FlexAttention fwd", 0.1, ">= 1.0x")], {}))

    def gpt2(budget, deadline, log, progress=None):
        progress([gpu_suite.make_row("GPT-2 step, eager HF", 50.0)], {"eager": {}})
        raise gpu_suite.Stopped()

    monkeypatch.setattr(gpu_suite, "gpt2_rows", gpt2)
    monkeypatch.setattr(gpu_suite, "nm_rows", lambda deadline, log: pytest.fail("ran after stop"))
    md = tmp_path / "B.md"
    md.write_text(f"# B\n\n{gpu_suite.BEGIN_MARKER}\nold\n{gpu_suite.END_MARKER}\ntail\n")
    assert gpu_suite.run_suite(100.0, True, md) == 0
    text = md.read_text()
    assert "fwd D64" in text and "GPT-2 step, eager HF" in text and "stopped by" in text
    assert "_Partial" in text and text.endswith("tail\n") and "\nold\n" not in text
    data = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    assert data["complete"] is False
    assert [r["what"] for r in data["sections"]["gpt2"]][0] == "GPT-2 step, eager HF"


def test_sigterm_raises_stopped():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        gpu_suite._stop_on_sigterm()
        with pytest.raises(gpu_suite.Stopped):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode boundary
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_gpu_check_script_fits_eight_minutes():
    """The one-call GPU script: tests, then the suite, with hard timeouts summing to <= 8 min,
    the suite's budget inside its timeout, and results copied to $OUT."""
    import re

    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    timeouts = [int(t) for t in re.findall(r"timeout -k (?:\d+) (\d+) ", text)]
    kills = [int(k) for k in re.findall(r"timeout -k (\d+) ", text)]
    assert len(timeouts) == 2 and sum(timeouts) + sum(kills) <= 8 * 60, timeouts
    budget = float(re.search(r"--budget-s (\d+)", text).group(1))
    assert budget < timeouts[1]
    assert "tests/test_gpu_e2e.py" in text and "benchmarks/gpu_suite.py" in text
    assert '"$OUT/BENCHMARKS.md"' in text and "TRITON_CACHE_DIR" in text
    result = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
