"""spion_fx under torch.distributed: 2 CPU ranks on gloo (127.0.0.1), tiny GPT-2.

DESIGN.md, "State and life cycle": probes are all-reduced before any decision, so every rank takes
the same decision and builds the same pattern. Checked here:

- DDP around a sparsified model (sparsify the inner module, then wrap): patterns, phases, switch
  steps and probe maps are bitwise equal on both ranks, and the run equals a single-process run on
  the global batch (the two shards concatenated): per-rank A_s is a mean over batch and heads, so
  with equal shard sizes the all-reduced mean *is* the global-batch map, and DDP's averaged
  gradients are the global-batch gradients. Losses agree in the dense and the sparse phase.
- The coverage variant (spion-p, per-head patterns) likewise: same decisions on both ranks, and
  the mass kept each rank records is the same and meets the coverage.
- The other order (sparsify the DDP wrapper) also trains, with site names under ``module.``.
- N:M masks ("nm-2:4") are identical across ranks under DDP (they come from |W|, which DDP keeps
  identical).
- FSDP2 (``fully_shard``) on CPU/gloo: trains, ranks agree, and every layer keeps its own site
  although Dynamo compiles one graph for all blocks (the backend rewrites it per block instance).

All scenarios run in one spawn of two processes (tests/_dist_worker.py) to pay the start-up and
import cost once; each scenario's outcome (or its exception) is saved per rank and checked by the
tests below.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import _dist_worker as worker  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)

SCENARIOS = ["ddp_spion", "ddp_spion_p", "ddp_wrap_then_sparsify", "ddp_nm", "fsdp_spion"]
DENSE_STEPS = worker.SPION["max_dense_steps"]
SITES = {"transformer.h.0.attn", "transformer.h.1.attn"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(worker.run, args=(worker.WORLD, worker.free_port(), str(out), SCENARIOS),
             nprocs=worker.WORLD, join=True)
    results = {}
    for name in SCENARIOS:
        results[name] = [
            torch.load(os.path.join(out, f"{name}_rank{r}.pt"), weights_only=False)
            for r in range(worker.WORLD)
        ]
    return results


@pytest.fixture(scope="module")
def single():
    """Same model, policy and steps in this process, on the global batch."""
    torch._dynamo.reset()
    try:
        return worker.run_single_spion()
    finally:
        torch._dynamo.reset()


def _ok(runs, name):
    ranks = runs[name]
    for rank, res in enumerate(ranks):
        if not res["ok"]:
            pytest.fail(f"{name} failed on rank {rank}: {res['error']}\n{res['traceback']}")
    return ranks


def _assert_ranks_agree(ranks):
    """Decisions bitwise equal on every rank: patterns, phases, switch steps, probe maps, events."""
    first = ranks[0]
    for other in ranks[1:]:
        assert other["sites"].keys() == first["sites"].keys()
        assert other["step"] == first["step"]
        assert other["events"] == first["events"]
        for name, site in first["sites"].items():
            got = other["sites"][name]
            assert got["phase"] == site["phase"], name
            assert got["switch_step"] == site["switch_step"], name
            assert got["pattern"].dtype == torch.bool and torch.equal(got["pattern"], site["pattern"]), name
            assert torch.equal(got["map"], site["map"]), f"{name}: all-reduced probe maps differ"


def _mean_losses(ranks):
    """The global-batch loss: the mean of the per-rank means (equal shard sizes)."""
    return [sum(step) / len(step) for step in zip(*(r["losses"] for r in ranks))]


# ----------------------------------------------------------------------------------- DDP


def test_ddp_spion_ranks_take_the_same_decisions(runs):
    ranks = _ok(runs, "ddp_spion")
    _assert_ranks_agree(ranks)
    sites = ranks[0]["sites"]
    assert set(sites) == SITES
    assert all(s["phase"] == "sparse" and 0 < s["switch_step"] <= DENSE_STEPS for s in sites.values())
    assert any(not bool(s["pattern"].all()) for s in sites.values()), "patterns should be sparse"
    # the shards differ, so the ranks really saw different data
    assert ranks[0]["losses"][0] != ranks[1]["losses"][0]


def test_ddp_spion_equals_single_process_on_the_global_batch(runs, single):
    ranks = _ok(runs, "ddp_spion")
    mean = _mean_losses(ranks)
    switch = min(s["switch_step"] for s in single["sites"].values())
    assert switch < len(mean), "the run should reach the sparse phase"
    # dense phase, then sparse phase: the same losses as one process on the concatenated shards
    assert mean[:switch] == pytest.approx(single["losses"][:switch], rel=1e-4)
    assert mean[switch:] == pytest.approx(single["losses"][switch:], rel=1e-4)
    assert ranks[0]["events"] == single["events"]
    for name, site in single["sites"].items():
        got = ranks[0]["sites"][name]
        assert got["switch_step"] == site["switch_step"], name
        assert torch.equal(got["pattern"], site["pattern"]), name
        # mean of per-rank A_s (batch- and head-means over equal shards) == global-batch A_s
        torch.testing.assert_close(got["map"], site["map"], atol=1e-6, rtol=1e-5)


def test_ddp_spion_p_ranks_agree_and_meet_the_coverage(runs):
    ranks = _ok(runs, "ddp_spion_p")
    _assert_ranks_agree(ranks)
    sites = ranks[0]["sites"]
    assert set(sites) == SITES
    for name, site in sites.items():
        assert site["phase"] == "sparse" and site["pattern"].dim() == 3 and site["pattern"].shape[0] > 1, name
        assert torch.equal(site["mass_kept"], ranks[1]["sites"][name]["mass_kept"]), name
        assert bool((site["mass_kept"] >= worker.SPION_P["coverage"] - 1e-9).all()), name


def test_ddp_sparsify_the_wrapper_also_works(runs):
    """sparsify(DDP(model)): Dynamo compiles DDP.forward; state and names live on the wrapper."""
    ranks = _ok(runs, "ddp_wrap_then_sparsify")
    _assert_ranks_agree(ranks)
    assert set(ranks[0]["sites"]) == {f"module.{name}" for name in SITES}
    reference = _ok(runs, "ddp_spion")
    for got, want in zip(ranks, reference):
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
        for name, site in want["sites"].items():
            assert torch.equal(got["sites"][f"module.{name}"]["pattern"], site["pattern"])


def test_ddp_nm_masks_identical_across_ranks(runs):
    from spion_fx.runtime.nm import is_nm

    ranks = _ok(runs, "ddp_nm")
    first = ranks[0]
    assert first["masks"] and any(first["active"].values())
    assert first["losses"][-1] < first["losses"][0]
    for other in ranks[1:]:
        assert other["masks"].keys() == first["masks"].keys()
        for name, mask in first["masks"].items():
            assert torch.equal(other["masks"][name], mask), name
        for name, weight in first["weights"].items():
            assert torch.equal(other["weights"][name], weight), f"DDP let {name} drift"
    sparse = [n for n, active in first["active"].items() if active]
    assert sparse and all(not bool(first["masks"][n].all()) for n in sparse)
    # GPT-2's Conv1D stores W as [in, out]: groups of 4 run along the input dimension
    assert all(is_nm(first["masks"][n], 2, 4, transposed=True) for n in sparse)


# ----------------------------------------------------------------------------------- FSDP2


def test_fsdp2_trains_and_ranks_agree(runs, single):
    ranks = _ok(runs, "fsdp_spion")
    _assert_ranks_agree(ranks)
    sites = ranks[0]["sites"]
    assert sites and all(s["phase"] == "sparse" for s in sites.values())
    # the dense phase is plain data parallelism: the global-batch losses
    assert _mean_losses(ranks)[:DENSE_STEPS] == pytest.approx(single["losses"][:DENSE_STEPS], rel=1e-4)


def test_fsdp2_keeps_one_site_per_layer(runs, single):
    ranks = _ok(runs, "fsdp_spion")
    assert set(ranks[0]["sites"]) == set(single["sites"]) == SITES
