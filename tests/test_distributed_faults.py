"""Distributed training whose ranks' data differ never hangs or crashes (issue 19, items 1–2).

gloo on 127.0.0.1, tiny GPT-2 (2 layers, d 32, block 8), 2 and 3 ranks. Every spawn has a hard
deadline (the parent kills the ranks and fails the test), and every group a short gloo timeout,
so a diverged collective fails instead of stalling CI. Checked, with the ranks' patterns, maps,
phases, switch steps and events compared bitwise:

- a NaN on the last rank at a probe step (its probe is skipped; the others' are used);
- per-rank lengths that differ at probe steps under DDP (rank 0 alternating 32 / 16, rank 1 at
  24, rank 2 at 5 — shorter than one block): DDP's per-forward buffer broadcast no longer
  carries the state's length-sized buffers (spion_fx/ddp.py; gloo aborted before);
- rank 1 with no batch in any probe window (it contributes zeros and count 0);
- a 2-rank DDP run killed mid-step after the switch and restarted from its last checkpoint (a
  new spawn, as torchrun would) resumes with the same patterns, phases and step; the same
  checkpoint loads on 3 ranks and on 1 (this process).

One process: batches of another length than the probe frame are probed too (they used to be
skipped silently). All scenarios of one world size run in one spawn to pay start-up once.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import _dist_fault_worker as worker  # noqa: E402

DEADLINE_S = 300  # per spawn; a hang fails here instead of stalling CI


def _spawn(world: int, scenarios: list[str], out: str, expect_exit: int | None = None) -> None:
    """Run the scenarios on `world` ranks; kill them all and fail if they pass the deadline."""
    context = mp.start_processes(
        worker.run, args=(world, worker.free_port(), out, scenarios), nprocs=world, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks running {scenarios} passed the {DEADLINE_S} s deadline: a hang")
    except mp.ProcessExitedException as exc:
        if expect_exit is None or exc.exit_code != expect_exit:
            raise
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


def _load(out: str, name: str, world: int) -> list[dict]:
    ranks = [torch.load(os.path.join(out, f"{name}_w{world}_rank{r}.pt"), weights_only=False) for r in range(world)]
    for rank, res in enumerate(ranks):
        if not res["ok"]:
            pytest.fail(f"{name} on {world} ranks failed on rank {rank}: {res['error']}\n{res['traceback']}")
    return ranks


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dist_faults"))


@pytest.fixture(scope="module")
def two(out):
    """2 ranks: the fault scenarios, an uninterrupted run, then the same run killed mid-step."""
    _spawn(2, ["nan", "lengths", "empty", "uninterrupted", "killed"], out, expect_exit=worker.KILL_EXIT)
    return {name: _load(out, name, 2) for name in ("nan", "lengths", "empty", "uninterrupted")}


@pytest.fixture(scope="module")
def three(out, two):
    """3 ranks: the fault scenarios, and the 2-rank checkpoint loaded and trained on."""
    _spawn(3, ["nan", "lengths", "empty", "resumed"], out)
    return {name: _load(out, name, 3) for name in ("nan", "lengths", "empty", "resumed")}


@pytest.fixture(scope="module")
def restarted(out, two):
    """The killed 2-rank job relaunched on 2 ranks from its last checkpoint."""
    _spawn(2, ["resumed"], out)
    return _load(out, "resumed", 2)


def _assert_ranks_agree(ranks):
    first = ranks[0]
    assert first["sites"], "no attention sites"
    for other in ranks[1:]:
        assert other["step"] == first["step"]
        assert other["events"] == first["events"]
        assert other["sites"].keys() == first["sites"].keys()
        for name, site in first["sites"].items():
            got = other["sites"][name]
            assert got["phase"] == site["phase"], name
            assert got["switch_step"] == site["switch_step"], name
            assert torch.equal(got["pattern"], site["pattern"]), f"{name}: patterns differ across ranks"
            assert torch.equal(got["map"], site["map"]), f"{name}: probe maps differ across ranks"


def _assert_switched(ranks):
    first = ranks[0]
    assert first["step"] == worker.STEPS
    for name, site in first["sites"].items():
        assert site["phase"] == "sparse" and 0 < site["switch_step"] <= worker.POLICY["max_dense_steps"], name


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("scenario", ["nan", "lengths", "empty"])
def test_ranks_whose_data_differ_take_the_same_decisions(two, three, world, scenario):
    ranks = (two if world == 2 else three)[scenario]
    _assert_ranks_agree(ranks)
    _assert_switched(ranks)
    if scenario == "nan":
        assert math.isnan(ranks[-1]["losses"][worker.NAN_STEP]), "the fault was not injected"
        assert not math.isnan(ranks[0]["losses"][worker.NAN_STEP])
    if scenario == "lengths":
        # the probe frame is the longest length any rank probed
        assert all(site["map"].shape == (worker.SEQ, worker.SEQ) for site in ranks[0]["sites"].values())


def _assert_resumed(resumed, reference):
    for rank in resumed:
        restored = rank["restored"]
        assert restored["step"] == worker.KILL_AFTER
        want = reference[0]["sites"]
        for name, site in restored["sites"].items():
            assert site["phase"] == "sparse" and site["switch_step"] == want[name]["switch_step"], name
            assert torch.equal(site["pattern"], want[name]["pattern"]), name
        assert rank["step"] == reference[0]["step"] == worker.STEPS
        assert rank["losses"] == pytest.approx(reference[0]["losses"][worker.KILL_AFTER:], rel=1e-4)
        for name, site in rank["sites"].items():
            assert site["phase"] == want[name]["phase"] and torch.equal(site["pattern"], want[name]["pattern"])


def test_a_killed_run_restarts_from_its_checkpoint(two, restarted):
    _assert_ranks_agree(restarted)
    _assert_resumed(restarted, two["uninterrupted"])


def test_a_two_rank_checkpoint_loads_on_three_ranks(two, three):
    _assert_ranks_agree(three["resumed"])
    _assert_resumed(three["resumed"], two["uninterrupted"])


def test_a_two_rank_checkpoint_loads_on_one(two, out):
    torch._dynamo.reset()
    try:
        single = worker.resume(out, ddp=False)
    finally:
        torch._dynamo.reset()
    _assert_resumed([single], two["uninterrupted"])


def test_one_process_probes_batches_of_every_length():
    """A batch shorter than the probe frame is probed into its top-left corner (it used to be
    skipped: with per-batch padding only one length was ever probed)."""
    import spion_fx

    torch._dynamo.reset()
    try:
        model, ids = worker.model_and_ids()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        spion_fx.sparsify(model, "spion-cf", optimizer=opt, **{**worker.POLICY, "max_dense_steps": None})
        worker.step(model, opt, ids)  # step 0 at length 32: the frame is 32 x 32
        worker.step(model, opt, ids[:, :16])  # step 1 probes at 16, then the check
    finally:
        torch._dynamo.reset()
    for site in model.spion_state.attention_sites():
        assert site.checks_done == 1, site.spec.name
        probe_map = site.previous_map
        assert probe_map.shape == (worker.SEQ, worker.SEQ)
        assert probe_map[:16, :16].sum(-1).allclose(torch.ones(16)), "rows of the 16-token batch sum to 1"
        assert not probe_map[16:].any() and not probe_map[:, 16:].any()
