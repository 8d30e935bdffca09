"""Fine-tune a Hugging Face causal LM with the `Trainer` and SPION block-sparse attention.

    pip install -e ".[hf]"
    python examples/hf_trainer_spion.py --model gpt2 --seq-len 1024 --batch-size 4 \\
        --grad-accum 8 --steps 2000 --block-size 64 --probe-interval 50 --max-dense-steps 600

`--model` is a Hub name or a local model directory (its tokenizer encodes the text); without it a
small GPT-2 is built from a config and reads raw bytes (`python examples/hf_trainer_spion.py` runs
in a few minutes on a laptop CPU). The text is the Python standard library's source
(`spion_fx.data`, no download) unless `--data PATH` names a text file or folder.

The model is sparsified before the Trainer is built; `SpionCallback` then counts spion_fx's steps
by the optimizer the Trainer creates (so `--grad-accum` is handled), and adds `spion/...` figures
(sparse sites, density, attention mass kept, each switch) to the Trainer's logs.
`--resume` continues from the last checkpoint in `--output-dir`, patterns and phases included.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import spion_fx
from spion_fx.data import load_corpus


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="Hub name or local directory (default: a small byte-level GPT-2)")
    parser.add_argument("--data", help="text file or folder (default: the stdlib source)")
    parser.add_argument("--output-dir", default="spion_trainer_out")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=4, help="built-in model only")
    parser.add_argument("--d-model", type=int, default=128, help="built-in model only")
    parser.add_argument("--heads", type=int, default=4, help="built-in model only")
    parser.add_argument("--policy", default="spion-cf")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--probe-interval", type=int, default=10)
    parser.add_argument("--max-dense-steps", type=int, default=30)
    parser.add_argument("--inner", default=None, help="inner compiler (inductor by default; eager is fastest to start)")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer or None): a pretrained causal LM, or a byte-level GPT-2 from a config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa")
        return model, AutoTokenizer.from_pretrained(args.model)
    config = GPT2Config(
        vocab_size=256, n_positions=args.seq_len, n_embd=args.d_model, n_layer=args.layers,
        n_head=args.heads, use_cache=False, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config), None


def token_windows(args: argparse.Namespace, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    """Consecutive windows of `seq_len` tokens, enough for every step (labels = inputs: the
    model shifts them itself)."""
    needed = args.steps * args.batch_size * args.grad_accum
    text = load_corpus(args.data).train
    if tokenizer is None:
        ids = text.long()
    else:  # tokenize only as much text as the run can use (~4 bytes a token is plenty)
        chunk = bytes(text[: needed * args.seq_len * 4].tolist()).decode("utf-8", errors="ignore")
        ids = torch.tensor(tokenizer(chunk)["input_ids"], dtype=torch.long)
    count = min(needed, ids.numel() // args.seq_len)
    if count < 1:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the text ({ids.numel()} tokens)")
    windows = ids[: count * args.seq_len].view(count, args.seq_len)
    return [{"input_ids": row, "labels": row} for row in windows]


def main(argv: list[str] | None = None) -> Any:
    """Train; returns the Trainer (its `state.log_history` holds the `spion/...` figures)."""
    from transformers import Trainer, TrainingArguments

    from spion_fx.integrations.hf import SpionCallback

    args = parse_args(argv)
    model, tokenizer = build_model(args)
    # Sparsify the plain model before the Trainer wraps it; the optimizer comes later, from the
    # Trainer, and SpionCallback attaches spion_fx's step counter to it.
    spion_fx.sparsify(
        model, args.policy, inner=args.inner, block_size=args.block_size,
        probe_interval=args.probe_interval, max_dense_steps=args.max_dense_steps,
    )
    training = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=args.lr,
        warmup_steps=min(10, args.steps // 10), logging_steps=args.logging_steps,
        save_strategy="steps", save_steps=args.save_steps or args.steps, report_to=[],
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=token_windows(args, tokenizer),
                      callbacks=[SpionCallback()])
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    for event in model.spion_state.events:
        if event.get("event") == "switch":
            print(f"switch: {event['site']} at step {event['step']}, density {event['density']:.1%}")
    spion_fx.report(model)
    return trainer


if __name__ == "__main__":
    main()
