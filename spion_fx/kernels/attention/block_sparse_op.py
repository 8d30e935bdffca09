"""``spion::block_sparse_attention_{fwd,bwd}`` custom ops and the public ``block_sparse_attention``.

The ops are defined once here with a CPU kernel; the CUDA/Triton kernel registers itself for
"cuda" with ``torch.library.register_kernel`` against the same schemas. Fake kernels make both
ops traceable by torch.compile, and the forward's autograd formula calls the backward op, so
compiled training graphs keep them as two opaque nodes.

Conventions: causal is top-left aligned like SDPA's ``is_causal`` (query i sees key j iff
j <= i, also when Lq != Lk); key_padding_mask is bool [B, Lk] with True = real token; rows that
see no key output 0 and have lse = -inf; lse is not differentiable.
"""

from __future__ import annotations

import torch

from . import block_sparse_cpu
from .layout import BlockLayout

_FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, "
    "Tensor q_num_blocks, Tensor q_indices, int block_size, float scale, bool causal, "
    "Tensor? key_padding_mask, float dropout_p, Tensor seed, bool compat_spion) "
    "-> (Tensor out, Tensor lse)"
)
_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor kv_num_blocks, Tensor kv_indices, Tensor q_num_blocks, Tensor q_indices, "
    "int block_size, float scale, bool causal, Tensor? key_padding_mask, float dropout_p, "
    "Tensor seed, bool compat_spion) -> (Tensor dq, Tensor dk, Tensor dv)"
)

torch.library.define("spion::block_sparse_attention_fwd", _FWD_SCHEMA)
torch.library.define("spion::block_sparse_attention_bwd", _BWD_SCHEMA)

block_sparse_attention_fwd = torch.ops.spion.block_sparse_attention_fwd.default
block_sparse_attention_bwd = torch.ops.spion.block_sparse_attention_bwd.default


@torch.library.register_kernel("spion::block_sparse_attention_fwd", "cpu")
def _fwd_cpu(
    q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_size, scale, causal,
    key_padding_mask, dropout_p, seed, compat_spion,
):  # fmt: skip
    return block_sparse_cpu.forward(
        q, k, v, kv_num_blocks, kv_indices, block_size, scale, causal, key_padding_mask,
        dropout_p, seed, compat_spion,
    )  # fmt: skip


@torch.library.register_kernel("spion::block_sparse_attention_bwd", "cpu")
def _bwd_cpu(
    grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_size,
    scale, causal, key_padding_mask, dropout_p, seed, compat_spion,
):  # fmt: skip
    return block_sparse_cpu.backward(
        grad_out, q, k, v, out, lse, kv_num_blocks, kv_indices, block_size, scale, causal,
        key_padding_mask, dropout_p, seed, compat_spion,
    )  # fmt: skip


@torch.library.register_fake("spion::block_sparse_attention_fwd")
def _fwd_fake(q, k, v, *args):
    b, h, lq, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (b, h, lq), dtype=torch.float32
    )


@torch.library.register_fake("spion::block_sparse_attention_bwd")
def _bwd_fake(grad_out, q, k, v, *args):
    fmt = torch.contiguous_format
    return (
        torch.empty_like(q, memory_format=fmt),
        torch.empty_like(k, memory_format=fmt),
        torch.empty_like(v, memory_format=fmt),
    )


_LAYOUT_AND_FLAGS = (
    "kv_num_blocks", "kv_indices", "q_num_blocks", "q_indices", "block_size", "scale", "causal",
    "key_padding_mask", "dropout_p", "seed", "compat_spion",
)  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, *rest = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    named = dict(zip(_LAYOUT_AND_FLAGS, rest))
    tensors = {n: t for n, t in named.items() if isinstance(t, torch.Tensor)}
    ctx.tensor_names = list(tensors)
    ctx.scalars = {n: x for n, x in named.items() if not isinstance(x, torch.Tensor)}
    ctx.save_for_backward(q, k, v, out, lse, *tensors.values())


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, *saved = ctx.saved_tensors
    named = {**ctx.scalars, **dict(zip(ctx.tensor_names, saved))}
    dq, dk, dv = block_sparse_attention_bwd(
        grad_out.contiguous(), q, k, v, out, lse, *(named[n] for n in _LAYOUT_AND_FLAGS)
    )
    return (dq, dk, dv) + (None,) * len(_LAYOUT_AND_FLAGS)


torch.library.register_autograd(
    "spion::block_sparse_attention_fwd", _backward, setup_context=_setup_context
)


# ----------------------------------------------------------------------------- public function


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float | None = None,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    compat: str | None = None,
) -> torch.Tensor:
    """Attention restricted to ``layout``'s blocks; q [B, H, Lq, D], k/v [B, Hkv, Lk, D].

    ``layout`` is shared by the batch ([H', ...] tensors) or per input ([B', H', ...], B' = 1
    or B: ``BlockLayout.batched``, e.g. from ``routing.routed_layout``).

    scale defaults to 1/sqrt(D). causal is top-left aligned (key j visible to query i iff
    j <= i). key_padding_mask: bool [B, Lk], True = real token. dropout_p applies attention
    dropout (pass 0 in eval, as with SDPA). compat="spion" reproduces the original SPION's
    softmax, where pruned keys count as logit 0 in the denominator.
    """
    _validate(q, k, v, layout, causal, key_padding_mask, dropout_p, compat)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if _use_flex(q, k, v, layout, dropout_p, compat):
        return _flex_forward(q, k, v, layout, float(scale), causal, key_padding_mask)
    if dropout_p > 0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu")
    else:
        seed = torch.zeros((), dtype=torch.int64)
    out, _ = block_sparse_attention_fwd(
        q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.q_num_blocks, layout.q_indices,
        layout.block_size, float(scale), bool(causal), key_padding_mask, float(dropout_p), seed,
        compat == "spion",
    )  # fmt: skip
    return out


# No-grad CPU calls at least this large (Lq * Lk) may go to compiled FlexAttention. Measured on a
# 2-core machine (benchmarks/attention_cpu.py, L=2048, 10 % blocks) the native CPU kernel's
# forward beats compiled FlexAttention (1.37x), and a FlexAttention compile per shape costs
# seconds, so the route is off by default; set a size here to turn it on where Flex wins.
FLEX_NO_GRAD_MIN_ELEMENTS = float("inf")
_compiled_flex = None


def _is_traced(*tensors: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return any(is_fake(t) or torch._is_functional_tensor(t) for t in tensors) or (
        torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
    )


def _use_flex(q, k, v, layout: BlockLayout, dropout_p: float, compat: str | None) -> bool:
    if q.device.type != "cpu" or dropout_p > 0 or compat is not None or layout.batched:
        return False
    if torch.compiler.is_compiling() or _is_traced(q, layout.kv_num_blocks):
        # building the BlockMask reads tensor data: impossible while Dynamo or AOT autograd
        # traces (fake or functional tensors), so traced graphs keep the custom op
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    if q.dtype not in (torch.float32, torch.bfloat16):
        return False
    bs = layout.block_size
    lq, lk = q.shape[2], k.shape[2]
    return lq % bs == 0 and lk % bs == 0 and lq * lk >= FLEX_NO_GRAD_MIN_ELEMENTS


def _flex_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The same attention through FlexAttention: unmasked blocks as its "full" blocks, blocks
    on the causal diagonal (or all, with key padding) as partial blocks with a mask_mod."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from .layout import _compress_rows
    from .reference import layout_block_grid

    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    grid = layout_block_grid(layout)
    nqb, nkb = grid.shape[1], grid.shape[2]
    partial = torch.zeros_like(grid)
    if causal:
        grid = grid & torch.ones(nqb, nkb, dtype=torch.bool, device=grid.device).tril()
        partial = grid & torch.eye(nqb, nkb, dtype=torch.bool, device=grid.device)
    if key_padding_mask is not None:
        partial = grid
    full = grid & ~partial

    def mask_mod(b, h, q_idx, kv_idx):
        visible = q_idx >= kv_idx if causal else q_idx >= 0
        if key_padding_mask is not None:
            visible = visible & key_padding_mask[b, kv_idx]
        return visible

    def blocks(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num, idx = _compress_rows(g)
        idx = torch.nn.functional.pad(
            idx, (0, nkb - idx.shape[-1])
        )  # FlexAttention wants nKB columns
        return num[None], idx[None]

    kv_num, kv_idx = blocks(partial)
    full_num, full_idx = blocks(full)
    block_mask = BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=layout.block_size, mask_mod=mask_mod,
        seq_lengths=(q.shape[2], k.shape[2]),
    )  # fmt: skip
    gqa = q.shape[1] != k.shape[1]
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int]:
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D] with H a multiple of Hkv, one floating dtype (shared
    by the training op and the decode kernel); returns (B, H, Lq, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, heads, L, D], got {_shape(t)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    b, h, lq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k/v must be [B={b}, Hkv, Lk, D={d}], got {tuple(k.shape)}")
    if h % k.shape[1] != 0:
        raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({k.shape[1]})")
    return b, h, lq, d


def check_key_padding(key_padding_mask: torch.Tensor | None, b: int, lk: int) -> None:
    """A key-padding mask is None or bool [B, Lk] (True = a real key)."""
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, lk):
            raise ValueError(
                f"key_padding_mask must be bool [B={b}, Lk={lk}], got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    compat: str | None,
) -> None:
    b, h, lq, d = check_qkv(q, k, v)
    lk = k.shape[2]
    _check_layout_halves(layout)
    bs = layout.block_size
    if layout.num_heads not in (1, h):
        raise ValueError(f"layout must have 1 or {h} heads (H'), got {layout.num_heads}")
    if layout.num_batch not in (1, b):
        raise ValueError(f"a batched layout must have 1 or {b} inputs (B'), got {layout.num_batch}")
    if layout.num_q_blocks != -(-lq // bs):
        raise ValueError(
            f"layout has {layout.num_q_blocks} query blocks but Lq={lq} needs {-(-lq // bs)} "
            f"at block_size={bs}"
        )
    if layout.num_kv_blocks != -(-lk // bs):
        raise ValueError(
            f"layout has {layout.num_kv_blocks} kv blocks but Lk={lk} needs {-(-lk // bs)} "
            f"at block_size={bs}"
        )
    if layout.kv_num_blocks.device != q.device and q.device.type != "meta":
        raise ValueError(f"layout is on {layout.kv_num_blocks.device} but q is on {q.device}")
    check_key_padding(key_padding_mask, b, lk)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if compat not in (None, "spion"):
        raise ValueError(f"compat must be None or 'spion', got {compat!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")


def _check_layout_halves(layout: BlockLayout) -> None:
    """A layout whose kv rows and q columns disagree would train with the backward of another
    pattern: refused. Layouts from ``BlockLayout.from_dense`` (and the sites' layouts, built around
    its tensors) are verified by construction, so this costs no device sync; a hand-built one is
    read once and remembered. While tracing the data cannot be read: the eager calls check."""
    if torch.compiler.is_compiling() or layout.is_verified:
        return
    if layout.kv_num_blocks.device.type == "meta" or _is_traced(*layout._tensors()):
        return
    layout.check()


def _shape(t: object) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
