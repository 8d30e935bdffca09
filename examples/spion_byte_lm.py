"""The smallest complete use of spion_fx: an ordinary training loop plus one `sparsify` call.

    python examples/spion_byte_lm.py            # ~2 minutes on a 2-core CPU

`python -m spion_fx.demo` is the full version (progress bar, timings, validation, summary).
"""

from __future__ import annotations

import torch

import spion_fx
from spion_fx.data import BatchSampler, load_corpus
from spion_fx.demo import ByteTransformer

SEQ_LEN, BATCH, STEPS = 2048, 2, 60


def main() -> None:
    torch.manual_seed(0)
    model = ByteTransformer(SEQ_LEN, d_model=128, n_layers=4, n_heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    # Dense training with a stability probe every 10 steps; every layer switches to its own
    # block-sparse pattern once the attention maps settle (at step 30 at the latest).
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, probe_interval=10, max_dense_steps=30,
                      block_size=64, quantile=0.98)
    batches = BatchSampler(load_corpus().train, BATCH, SEQ_LEN)
    for step in range(STEPS):
        x, y = next(batches)
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    for event in model.spion_state.events:
        print(event)
    spion_fx.report(model)
    print("patterns:", spion_fx.save_patterns(model, "spion_patterns.png"))


if __name__ == "__main__":
    main()
