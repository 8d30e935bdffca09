"""The demo runs end to end with tiny settings, prints its summary, writes the PNG, and survives
Ctrl-C (a KeyboardInterrupt raised from inside the training loop) with the summary still printed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from spion_fx import demo
from spion_fx.data import BatchSampler, load_corpus

TINY = [
    "--steps", "8", "--seq-len", "128", "--batch-size", "2", "--d-model", "32", "--layers", "2",
    "--heads", "2", "--probe-interval", "2", "--min-dense-steps", "0", "--max-dense-steps", "4",
    "--block-size", "32", "--inner", "eager", "--eval-every", "4",
]


def tiny_config(tmp_path: Path) -> demo.DemoConfig:
    return demo.parse_args([*TINY, "--out", str(tmp_path)])


def quiet_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=140, force_terminal=False), buffer


def test_corpus_is_deterministic_and_split_by_file() -> None:
    first, second = load_corpus(), load_corpus()
    assert torch.equal(first.train, second.train)
    assert first.validation.numel() > 10_000 and first.train.numel() > 9 * first.validation.numel()
    x, y = next(BatchSampler(first.train, 3, 64, seed=0))
    assert x.shape == y.shape == (3, 64)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_demo_completes_with_summary_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = demo.main([*TINY, "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert not result.interrupted
    assert len(result.records) == 8
    assert result.switches, "every layer should switch at max_dense_steps"
    assert {r.phase for r in result.records} == {"dense", "sparse"}
    assert "sparse-phase speed-up" in printed and "validation loss" in printed
    assert result.pattern_png is not None and Path(result.pattern_png).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps_done"] == 8 and summary["switches"]
    assert [step for step, _, _ in result.validation] == [0, 4, 8]


def test_ctrl_c_stops_cleanly_and_still_summarises(tmp_path: Path) -> None:
    def interrupt(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    console, buffer = quiet_console()
    result = demo.run(tiny_config(tmp_path), console=console, step_hook=interrupt)
    printed = buffer.getvalue()
    assert result.interrupted
    assert len(result.records) == 6
    assert "interrupted" in printed and "training step time" in printed
    assert (tmp_path / "patterns.png").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["interrupted"] is True


def test_steady_step_times_skip_compiles_and_probes() -> None:
    records = [demo.StepRecord(i, "dense" if i < 6 else "sparse", i == 4, float(i), 0.0) for i in range(10)]
    times = demo.steady_step_times(records, skip=2)
    assert times == {"dense": [2.0, 3.0, 5.0], "sparse": [8.0, 9.0]}
