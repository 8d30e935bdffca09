"""Worker side of tests/test_distributed.py (a module of its own so spawned processes can import it).

Each spawned rank joins a gloo group on 127.0.0.1, runs the requested scenarios one after the
other and saves what it saw (losses, patterns, phases, switch steps, masks) to
``<out_dir>/<scenario>_rank<r>.pt``; an exception is saved too (as text), so one failing scenario
does not hide the others and the parent test can report it. Nothing here asserts: the parent
compares the ranks with each other and with a single-process run of the same global batch.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

SEQ, BLOCK, GLOBAL_BATCH, WORLD = 32, 8, 4, 2
SPION = dict(
    inner="aot_eager", block_size=BLOCK, probe_interval=2, quantile=0.6, filter_size=3,
    max_dense_steps=6,
)
SPION_P = dict(SPION, coverage=0.8, per_head=True)
SPION_STEPS = 9  # steps 0..5 dense (switch decided at the end of step 5 at the latest), 6..8 sparse
NM_SEQ, NM_STEPS = 16, 4
FSDP_STEPS = 8


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- shared pieces


def global_batch(seq_len: int = SEQ) -> tuple[Any, torch.Tensor]:
    """The unsparsified tiny GPT-2 (train mode) and the global batch of token ids."""
    from spion_fx import zoo

    model, kwargs = zoo.build("gpt2", seq_len=seq_len, batch=GLOBAL_BATCH)
    model.train()
    return model, kwargs["input_ids"]


def shard(ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = ids.shape[0] // world
    return ids[rank * per:(rank + 1) * per]


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    labels = ids % logits.shape[-1]  # learnable toy task: predict the token itself
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def train(model, opt, ids: torch.Tensor, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def spion_summary(state) -> dict[str, Any]:
    sites = {}
    for site in state.attention_sites():
        sites[site.spec.name] = {
            "phase": site.phase,
            "switch_step": int(site.switch_step),
            "pattern": site.pattern.clone(),
            "map": site.previous_map.clone(),
        }
    events = [dict(e) for e in state.events if e.get("event") == "switch"]
    graphs = [sorted((d.kind, d.site) for d in record.decisions) for record in state.graph_records]
    return {"sites": sites, "events": events, "step": int(state.step), "graphs": graphs}


def run_single_spion(steps: int = SPION_STEPS) -> dict[str, Any]:
    """The reference: one process, the global batch, same policy."""
    import spion_fx

    torch.manual_seed(0)
    model, ids = global_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, **SPION)
    losses = train(model, opt, ids, steps)
    return {"losses": losses, **spion_summary(model.spion_state)}


# ----------------------------------------------------------------------------- scenarios


def scenario_ddp_spion(rank: int, world: int) -> dict[str, Any]:
    """Recommended order: sparsify the inner module, then wrap it in DDP."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import spion_fx

    torch.manual_seed(0)
    model, ids = global_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, **SPION)
    ddp = DDP(model)
    losses = train(ddp, opt, shard(ids, rank, world), SPION_STEPS)
    return {"losses": losses, **spion_summary(model.spion_state)}


def scenario_ddp_spion_p(rank: int, world: int) -> dict[str, Any]:
    """The coverage variant with per-head patterns, like ddp_spion; also each site's mass kept."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import spion_fx

    torch.manual_seed(0)
    model, ids = global_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    spion_fx.sparsify(model, "spion-p", optimizer=opt, **SPION_P)
    ddp = DDP(model)
    losses = train(ddp, opt, shard(ids, rank, world), SPION_STEPS)
    summary = spion_summary(model.spion_state)
    for site in model.spion_state.attention_sites():
        summary["sites"][site.spec.name]["mass_kept"] = site.mass_kept_per_head.clone()
    return {"losses": losses, **summary}


def scenario_ddp_wrap_then_sparsify(rank: int, world: int) -> dict[str, Any]:
    """The other order: sparsify the DDP wrapper itself (Dynamo then compiles DDP.forward)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import spion_fx

    torch.manual_seed(0)
    model, ids = global_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ddp = DDP(model)
    spion_fx.sparsify(ddp, "spion-cf", optimizer=opt, **SPION)
    losses = train(ddp, opt, shard(ids, rank, world), SPION_STEPS)
    return {"losses": losses, **spion_summary(ddp.spion_state)}


def scenario_ddp_nm(rank: int, world: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import spion_fx

    torch.manual_seed(0)
    model, ids = global_batch(NM_SEQ)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    spion_fx.sparsify(model, "nm-2:4", optimizer=opt, inner="eager")
    ddp = DDP(model)
    losses = train(ddp, opt, shard(ids, rank, world), NM_STEPS)
    controller = model.spion_state.linear
    masks = {name: site.mask.clone() for name, site in controller.sites.items()}
    active = {name: bool(site.active) for name, site in controller.sites.items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("c_attn.weight")}
    return {"losses": losses, "masks": masks, "active": active, "weights": weights}


def scenario_fsdp_spion(rank: int, world: int) -> dict[str, Any]:
    """FSDP2: fully_shard each block and the root, then sparsify (the reverse order runs alike)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import spion_fx

    torch.manual_seed(0)
    model, ids = global_batch()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)  # over the sharded (DTensor) parameters
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, **SPION)
    losses = train(model, opt, shard(ids, rank, world), FSDP_STEPS)
    return {"losses": losses, **spion_summary(model.spion_state)}


SCENARIOS = {
    "ddp_spion": scenario_ddp_spion,
    "ddp_spion_p": scenario_ddp_spion_p,
    "ddp_wrap_then_sparsify": scenario_ddp_wrap_then_sparsify,
    "ddp_nm": scenario_ddp_nm,
    "fsdp_spion": scenario_fsdp_spion,
}


def run(rank: int, world: int, port: int, out_dir: str, scenarios: list[str]) -> None:
    """torch.multiprocessing.spawn entry point."""
    run_scenarios(rank, world, port, [(name, lambda name=name: SCENARIOS[name](rank, world)) for name in scenarios],
                  lambda name: os.path.join(out_dir, f"{name}_rank{rank}.pt"), timeout_s=60)


def run_scenarios(rank: int, world: int, port: int, scenarios, result_path, *, timeout_s: int) -> None:
    """Join a gloo group and run each (name, scenario) in turn, saving its outcome (or its
    exception, reported by the parent test per scenario) at result_path(name). The group's
    timeout makes a diverged collective fail instead of hanging the other ranks."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(1)  # several ranks on a small CPU box
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        for name, scenario in scenarios:
            torch._dynamo.reset()
            try:
                result = {"ok": True, **scenario()}
            except Exception as exc:
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                          "traceback": traceback.format_exc()}
            torch.save(result, result_path(name))
            dist.barrier()
    finally:
        dist.destroy_process_group()

