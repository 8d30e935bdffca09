"""SPION on a model built from PyTorch's own nn.TransformerEncoder (no custom attention code).

A causal byte-level language model: embedding → nn.TransformerEncoder (nn.MultiheadAttention
inside, called with a causal mask and is_causal=True) → vocabulary head, trained with an
ordinary loop. `spion_fx.sparsify(model, "spion-cf", ...)` finds one attention site per layer
(Dynamo keeps nn.MultiheadAttention as one opaque call; spion_fx expands it), trains densely
with a stability probe, and switches every layer to its block-sparse pattern.

Run it for real (a few minutes on a laptop CPU; add --inner inductor for compiled kernels):

    python examples/transformer_encoder_spion.py
    python examples/transformer_encoder_spion.py --seq-len 4096 --layers 6 --steps 300 --max-dense-steps 100

The test suite runs it at toy sizes: see tests/test_mha.py::test_transformer_encoder_example.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import spion_fx
from spion_fx.data import BatchSampler, load_corpus


class EncoderLM(nn.Module):
    def __init__(self, seq_len: int, d_model: int, layers: int, heads: int, vocab: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.1, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(seq_len), persistent=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        h = self.embed(tokens) + self.position[:length]
        h = self.encoder(h, mask=self.causal[:length, :length], is_causal=True)
        logits = self.head(h)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--probe-interval", type=int, default=10)
    p.add_argument("--max-dense-steps", type=int, default=60, help="switch to sparse by this step at the latest")
    p.add_argument("--inner", default=None, help="inner compiler: inductor (policy default), aot_eager or eager")
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> EncoderLM:
    args = parse_args(argv)
    torch.manual_seed(0)
    model = EncoderLM(args.seq_len, args.d_model, args.layers, args.heads)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, inner=args.inner, block_size=args.block_size,
                      probe_interval=args.probe_interval, max_dense_steps=args.max_dense_steps)
    batches = BatchSampler(load_corpus().train, args.batch_size, args.seq_len)
    model.train()
    for step in range(args.steps):
        x, y = next(batches)
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % args.log_every == 0 or step == args.steps - 1:
            phases = [site.phase for site in model.spion_state.attention_sites()]
            print(f"step {step:4d}  loss {loss.item():.3f}  sparse layers {phases.count('sparse')}/{len(phases)}")
    for event in model.spion_state.events:
        print(event)
    spion_fx.report(model)
    return model


if __name__ == "__main__":
    main()
