"""BENCHMARKS.md is written section by section: each benchmark replaces only what it measured."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402
import run_cpu  # noqa: E402


def _cpu(names: list[str], marker: str) -> str:
    results = [{"name": n, "status": "ok", "rows": [{"value": marker}], "seconds": 1.0, "title": n} for n in names]
    return run_cpu.cpu_section(results, quick=False)


def test_only_the_rerun_subsections_change(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# title\n\n<!-- gpu:begin -->\n## GPU\nkept\n<!-- gpu:end -->\n")
    run_cpu.write_section(path, _cpu(["attention_cpu", "train_step", "quality"], "first"))
    run_cpu.write_section(path, _cpu(["train_step"], "second"))  # run_cpu.py --only train_step
    text = path.read_text()
    cpu = common.marked_section(text, run_cpu.BEGIN, run_cpu.END)
    names = [line[4:] for line in cpu.splitlines() if line.startswith("### ")]
    assert names == ["attention_cpu", "train_step", "quality"]  # run_cpu's order, none lost
    train_step = cpu.split("### train_step")[1].split("### ")[0]
    assert "second" in train_step and "first" not in train_step
    assert cpu.count("first") == 2
    assert common.marked_section(text, "<!-- gpu:begin -->", "<!-- gpu:end -->") == "## GPU\nkept\n"
    assert text.startswith("# title\n")


def test_rewrite_section_appends_then_replaces_in_place():
    text = common.rewrite_section("# title\n", "one", "<!-- x:begin -->", "<!-- x:end -->")
    assert text == "# title\n\n<!-- x:begin -->\none\n<!-- x:end -->\n"
    again = common.rewrite_section(text + "tail\n", "two\n", "<!-- x:begin -->", "<!-- x:end -->")
    assert again == "# title\n\n<!-- x:begin -->\ntwo\n<!-- x:end -->\ntail\n"
