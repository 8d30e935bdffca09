"""Data-parallel SPION training launched by torchrun (DistributedDataParallel).

    torchrun --standalone --nproc_per_node=8 examples/ddp_torchrun.py --seq-len 4096 --steps 500
    torchrun --standalone --nproc_per_node=2 examples/ddp_torchrun.py --cpu      # 2 CPU processes, gloo

One process per GPU (nccl), or CPU processes with gloo (`--cpu`, or no GPU). Every rank builds the
same model, sparsifies it, then wraps it in DDP: sparsify first, so ``model.spion_state`` and the
site names do not depend on the wrapper. Each rank reads its own batches; spion_fx all-reduces the
attention probes before deciding and rank 0's pattern is broadcast, so all ranks switch at the same
step with identical patterns (`--summary-dir` writes each rank's view as JSON to check that).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import spion_fx
from spion_fx.data import BatchSampler, load_corpus
from spion_fx.demo import ByteTransformer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU processes with gloo even if GPUs exist")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2, help="per rank")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--probe-interval", type=int, default=10)
    parser.add_argument("--max-dense-steps", type=int, default=20)
    parser.add_argument("--quantile", type=float, default=0.98, help="SPION-CF's threshold quantile")
    parser.add_argument("--inner", default=None, help="inner compiler (inductor by default)")
    parser.add_argument("--summary-dir", help="write rank<r>.json with losses, phases and patterns")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one rank (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK); returns this rank's summary."""
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if "MASTER_ADDR" not in os.environ:  # started without torchrun: a group of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        model = ByteTransformer(args.seq_len, args.d_model, args.layers, args.heads).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        spion_fx.sparsify(
            model, "spion-cf", optimizer=opt, inner=args.inner, block_size=args.block_size,
            probe_interval=args.probe_interval, max_dense_steps=args.max_dense_steps,
            quantile=args.quantile,
        )
        ddp = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
        batches = BatchSampler(load_corpus().train, args.batch_size, args.seq_len, seed=rank)
        losses = []
        for step in range(args.steps):
            x, y = (t.to(device) for t in next(batches))
            loss = ddp(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
                print(f"step {step:4d}  loss {loss.item():.3f} (rank 0's batch)", flush=True)
        summary = _summary(model, rank, world, losses)
        if args.summary_dir:
            Path(args.summary_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.summary_dir) / f"rank{rank}.json").write_text(json.dumps(summary))
        if rank == 0:
            spion_fx.report(model)
        return summary
    finally:
        dist.destroy_process_group()


def _summary(model: torch.nn.Module, rank: int, world: int, losses: list[float]) -> dict[str, Any]:
    state = model.spion_state
    sites = {
        site.spec.name: {"phase": site.phase, "switch_step": int(site.switch_step),
                         "pattern": site.pattern.int().tolist()}
        for site in state.attention_sites()
    }
    return {"rank": rank, "world_size": world, "step": int(state.step), "losses": losses, "sites": sites}


if __name__ == "__main__":
    main()
