"""Train with N:M weight sparsity, bake it with `spion_fx.finalize`, save the packed model, reload it.

    python examples/nm_finalize_save.py --n 2 --m 4 --steps 300 --seq-len 256 --out nm_model

Training: ``sparsify(model, "nm-2:4")`` keeps an N:M mask per linear layer (recomputed from |W|,
SR-STE gradients), so the model learns to live with it. `finalize(model, mode="memory")` then
replaces each N:M layer with a `PackedNMLinear` holding only the kept values and their positions
(``mode="speed"``, the default, instead keeps whichever kernel is fastest on this device, dense
included). `desparsify` drops the training machinery, and the result is saved as the model's config
plus one state_dict with a list of the packed layers; `load_finalized` rebuilds it from those.
The model is a small byte-level GPT-2 built from a config; the text is the stdlib source
(`spion_fx.data`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import spion_fx
from spion_fx.data import BatchSampler, fixed_batches, load_corpus
from spion_fx.kernels.nm.packed import PackedNMLinear

PACKED_FILE = "spion_nm_model.pt"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--inner", default=None, help="inner compiler (inductor by default)")
    parser.add_argument("--out", default="nm_model", help="directory for the saved model")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=256, n_positions=args.seq_len, n_embd=args.d_model, n_layer=args.layers,
        n_head=args.heads, use_cache=False, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    return sum(lm_loss(model, x, y).item() for x, y in batches) / len(batches)


def save_finalized(model: nn.Module, directory: str | Path) -> Path:
    """The config (Hugging Face's config.json) plus one file: the state_dict and, for every packed
    layer, what `PackedNMLinear` needs beyond its buffers."""
    directory = Path(directory)
    model.config.save_pretrained(directory)
    packed = {
        name: {"n": layer.n, "m": layer.m, "in_features": layer.in_features}
        for name, layer in model.named_modules() if isinstance(layer, PackedNMLinear)
    }
    path = directory / PACKED_FILE
    torch.save({"packed_layers": packed, "state_dict": model.state_dict()}, path)
    return path


def load_finalized(directory: str | Path) -> nn.Module:
    """Rebuild the architecture from the config, put packed layers where they were, load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    saved = torch.load(directory / PACKED_FILE, weights_only=True)
    state = saved["state_dict"]
    for name, spec in saved["packed_layers"].items():
        layer = PackedNMLinear(state[f"{name}.values"], state[f"{name}.index_bytes"], spec["n"], spec["m"],
                               spec["in_features"], state.get(f"{name}.bias"))
        # re-packed through from_dense so the kernel is chosen for this machine's device
        layer = PackedNMLinear.from_dense(layer.to_dense(), layer.bias, spec["n"], spec["m"])
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer)
    model.load_state_dict(state)
    return model.eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, finalize, save, reload; returns the validation losses at each stage and the sizes."""
    args = parse_args(argv)
    corpus = load_corpus()
    model = build_model(args).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    spion_fx.sparsify(model, f"nm-{args.n}:{args.m}", optimizer=opt, inner=args.inner)
    batches = BatchSampler(corpus.train, args.batch_size, args.seq_len)
    for step in range(args.steps):
        loss = lm_loss(model, *next(batches))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    validation = fixed_batches(corpus.validation, 2, args.batch_size, args.seq_len)
    trained = evaluate(model, validation)  # the masked weights, as trained

    done = spion_fx.finalize(model, mode="memory", cache=Path(args.out) / "kernel_timings.json")
    for site, what in done.items():
        print(f"{site}: {what}")
    spion_fx.desparsify(model)  # inference from here on: plain PyTorch with packed layers
    finalized = evaluate(model, validation)
    path = save_finalized(model, args.out)
    reloaded_model = load_finalized(args.out)
    reloaded = evaluate(reloaded_model, validation)

    packed = [m for m in reloaded_model.modules() if isinstance(m, PackedNMLinear)]
    packed_bytes = sum(m.memory_bytes() for m in packed)
    dense_bytes = sum(m.dense_bytes() for m in packed)
    print(f"validation loss: trained {trained:.4f}, finalized {finalized:.4f}, reloaded {reloaded:.4f}")
    print(f"{len(packed)} packed layers: {packed_bytes / 1e6:.2f} MB instead of {dense_bytes / 1e6:.2f} MB dense; "
          f"saved to {path} ({os.path.getsize(path) / 1e6:.2f} MB)")
    return {"trained": trained, "finalized": finalized, "reloaded": reloaded, "packed_layers": len(packed),
            "packed_bytes": packed_bytes, "dense_bytes": dense_bytes, "path": str(path)}


if __name__ == "__main__":
    main()
