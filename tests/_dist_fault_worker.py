"""Worker side of tests/test_distributed_faults.py: ranks whose data differ (issue 19).

Each spawned rank joins a gloo group on 127.0.0.1 (with a short timeout, so a mismatched
collective fails instead of hanging), runs the requested scenarios and saves what it saw per
scenario to ``<out_dir>/<scenario>_w<world>_rank<r>.pt`` (an exception is saved as text). The
scenario ``killed`` ends the process with ``os._exit`` in the middle of a step, as a killed job
would; it must come last.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from _dist_worker import free_port, lm_loss, run_scenarios, spion_summary  # noqa: F401  (free_port: for the parent)

SEQ, BLOCK, STEPS, KILL_AFTER = 32, 8, 9, 7  # steps 0..5 dense (forced switch at 6), 6..8 sparse
POLICY = dict(inner="eager", block_size=BLOCK, probe_interval=2, quantile=0.6, filter_size=3, max_dense_steps=6)
NAN_STEP = 3  # a probe step (odd steps probe with probe_interval=2)
KILL_EXIT = 17


def model_and_ids(batch: int = 2, seed: int = 0):
    from spion_fx import zoo

    torch.manual_seed(seed)
    model, kwargs = zoo.build("gpt2", seq_len=SEQ, batch=batch)
    return model.train(), kwargs["input_ids"]


def sparsified(ddp: bool = False):
    import spion_fx

    model, ids = model_and_ids()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, **POLICY)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return model, DDP(model), opt, ids
    return model, model, opt, ids


def step(run, opt, ids) -> float:
    loss = lm_loss(run, ids)
    if torch.isfinite(loss):
        loss.backward()
    opt.step()  # every rank steps (the state counts optimizer steps), even after a bad batch
    opt.zero_grad()
    return loss.item()


def summary(model, losses) -> dict[str, Any]:
    return {"losses": losses, **spion_summary(model.spion_state)}


# ----------------------------------------------------------------------------- scenarios


def scenario_nan(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """The last rank's batch turns into NaN at a probe step (its probe is skipped)."""
    model, run, opt, ids = sparsified()
    ids = (ids + rank) % 100
    losses = []
    for t in range(STEPS):
        batch = ids
        if rank == world - 1 and t == NAN_STEP:
            with torch.no_grad():
                model.transformer.wte.weight[127] = float("nan")
            batch = ids.clone()
            batch[:, 0] = 127
        losses.append(step(run, opt, batch))
        if rank == world - 1 and t == NAN_STEP:
            with torch.no_grad():
                model.transformer.wte.weight[127] = 0.0
    return summary(model, losses)


def scenario_lengths(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Under DDP, each rank its own length (rank 2 shorter than a block), rank 0 alternating
    32 / 16 (HF collators pad each batch to its own length). DDP broadcasts every buffer of the
    module before each forward; the state's buffers (sized by each rank's length) are kept out
    of that broadcast (spion_fx/ddp.py) — before, gloo aborted on the second forward."""
    model, run, opt, ids = sparsified(ddp=True)
    ids = (ids + rank) % 100
    own = {0: SEQ, 1: 24, 2: 5}[rank]
    losses = []
    for t in range(STEPS):
        length = (16 if t % 2 else SEQ) if rank == 0 else own
        losses.append(step(run, opt, ids[:, :length]))
    return summary(model, losses)


def scenario_empty(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Rank 1 has no batch in any probe step: it only takes its optimizer step."""
    model, run, opt, ids = sparsified()
    ids = (ids + rank) % 100
    losses = []
    for t in range(STEPS):
        if rank == 1 and t % 2 == 1 and t < POLICY["max_dense_steps"]:
            opt.step()
            losses.append(float("nan"))
            continue
        losses.append(step(run, opt, ids))
    return summary(model, losses)


def _checkpoint_path(out_dir: str, t: int) -> str:
    return os.path.join(out_dir, f"ckpt_step{t}.pt")


def scenario_uninterrupted(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """DDP on the same data on every rank, for the resumed runs to match."""
    model, run, opt, ids = sparsified(ddp=True)
    losses = [step(run, opt, ids) for _ in range(STEPS)]
    return summary(model, losses)


def scenario_killed(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    """Like `uninterrupted`, rank 0 saving a checkpoint after every step; killed mid-step."""
    model, run, opt, ids = sparsified(ddp=True)
    for t in range(STEPS):
        loss = lm_loss(run, ids)
        loss.backward()
        if t == KILL_AFTER:
            os._exit(KILL_EXIT)  # between backward and the optimizer step: no cleanup at all
        opt.step()
        opt.zero_grad()
        if rank == 0:
            tmp = _checkpoint_path(out_dir, t) + ".tmp"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": t + 1}, tmp)
            os.replace(tmp, _checkpoint_path(out_dir, t))
        dist.barrier()
    raise AssertionError("the killed run was not killed")


def resume(out_dir: str, ddp: bool) -> dict[str, Any]:
    """Restart from the last checkpoint (the one before the kill) and train to STEPS."""
    model, run, opt, ids = sparsified(ddp=ddp)
    ckpt = torch.load(_checkpoint_path(out_dir, KILL_AFTER - 1), weights_only=False)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    restored = spion_summary(model.spion_state)
    losses = [step(run, opt, ids) for _ in range(ckpt["step"], STEPS)]
    return {"restored": restored, **summary(model, losses)}


def scenario_resumed(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    return resume(out_dir, ddp=True)


SCENARIOS = {
    "nan": scenario_nan,
    "lengths": scenario_lengths,
    "empty": scenario_empty,
    "uninterrupted": scenario_uninterrupted,
    "resumed": scenario_resumed,
    "killed": scenario_killed,
}


def run(rank: int, world: int, port: int, out_dir: str, scenarios: list[str]) -> None:
    """torch.multiprocessing entry point; a 45 s gloo timeout: a diverged collective fails."""
    run_scenarios(rank, world, port,
                  [(name, lambda name=name: SCENARIOS[name](rank, world, out_dir)) for name in scenarios],
                  lambda name: os.path.join(out_dir, f"{name}_w{world}_rank{rank}.pt"), timeout_s=45)
