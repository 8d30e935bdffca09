"""Records of the places in an FX graph that sparsity can be applied to.

A detection pass produces these; the rewrite pass consumes them. They hold fx.Node references (so
they are only valid for the graph they were found in) plus plain facts for reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

# How the attention mask enters the scores:
#   "none"      no mask
#   "additive"  scores + mask (float; -inf / finfo.min where masked)
#   "bool_keep" boolean, True = attend (SDPA's convention)
#   "bool_fill" boolean, True = masked out (masked_fill(mask, fill_value) before softmax)
MaskKind = Literal["none", "additive", "bool_keep", "bool_fill"]


@dataclass
class AttentionSite:
    """One attention computation softmax(q kᵀ · scale + mask) v.

    q, k, v are the nodes of the [B, H, L, D] operands *before* any transpose of k, so that a
    runtime module can call SDPA-like kernels on them directly. For the eager form, ``output`` is
    the final matmul node and ``nodes`` lists the whole matched chain (scores … output).
    """

    name: str  # owning module's qualified name, e.g. "model.layers.0.self_attn"
    form: Literal["sdpa", "eager"]
    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None = None
    mask_kind: MaskKind = "none"
    mask_fill_value: float | None = None  # for "bool_fill"
    is_causal: bool = False
    scale: float | fx.Node | None = None  # None = 1/sqrt(D)
    dropout_p: float = 0.0
    dropout_train_only: bool = True  # F.dropout(training=self.training) vs unconditional
    enable_gqa: bool = False
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    q_len: int | None = None
    kv_len: int | None = None
    cross_attention: bool = False
    nodes: list[fx.Node] = field(default_factory=list)
    # --- added by the detector (defaults keep the meaning of the fields above) ---
    # scale is a *divisor* (scores / scale_node); only set when `scale` is a node — a constant
    # divisor c is recorded as scale = 1/c.
    scale_is_divisor: bool = False
    # Further additive terms, applied after `mask` (all mask_kind "additive"): the effective
    # additive mask is mask + sum(extra_masks). T5 eager adds position_bias and then the mask.
    extra_masks: list[fx.Node] = field(default_factory=list)
    # Rank of q/k/v: 4 = [B, H, L, D]; 3 = [B*H, L, D] (bmm / baddbmm style, num_heads only when
    # the reshape that folded the heads is visible in the graph, else None).
    rank: int = 4
    # When k/v reached the attention through HF's repeat_kv (expand + reshape) or
    # repeat_interleave, `k`/`v` are the un-repeated [B, H_kv, S, D] tensors, enable_gqa is True
    # and these are the repeat nodes (dead once the site is rewritten).
    kv_repeat_nodes: list[fx.Node] = field(default_factory=list)
    # The dtype an eager chain's softmax computes in (softmax(..., dtype=torch.float32)), read
    # once by detection from the softmax call; None without one, and always for SDPA.
    softmax_dtype: torch.dtype | None = None

    @property
    def kind(self) -> Literal["attention"]:
        return "attention"

    @property
    def gqa_ratio(self) -> int:
        if self.num_heads and self.num_kv_heads:
            return self.num_heads // self.num_kv_heads
        return 1


@dataclass
class LinearSite:
    """One matmul with a parameter weight: y = x Wᵀ + b (linear) or y = b + x W (addmm, Conv1D)."""

    name: str  # owning module's qualified name, e.g. "model.layers.0.self_attn.q_proj"
    form: Literal["linear", "addmm", "matmul", "embedding"]
    output: fx.Node
    input: fx.Node
    weight: fx.Node  # placeholder of the parameter
    weight_name: str  # qualified parameter name, e.g. "model.layers.0.self_attn.q_proj.weight"
    weight_shape: tuple[int, ...]
    bias: fx.Node | None = None
    # True when the weight is stored [in, out] (Conv1D / addmm); N:M groups run along `in`.
    weight_transposed: bool = False
    role: Literal["linear", "embedding", "lm_head"] = "linear"

    @property
    def kind(self) -> Literal["linear"]:
        return "linear"

    @property
    def in_features(self) -> int:
        return self.weight_shape[0] if self.weight_transposed else self.weight_shape[-1]

    @property
    def out_features(self) -> int:
        return self.weight_shape[-1] if self.weight_transposed else self.weight_shape[0]
