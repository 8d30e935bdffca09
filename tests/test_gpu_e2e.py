"""End to end on CUDA: HF GPT-2 and Llama (GQA) trained through SPION's switch, and the sparse
attention's CUDA (Triton) output against the CPU kernel on the same inputs.

The training tests are marked ``gpu`` and skip without CUDA. The kernel comparison also has a
CPU form: the Triton kernels under ``TRITON_INTERPRET=1`` against the CPU kernel, so the check
itself runs on every machine.
"""

from __future__ import annotations

import math

import pytest
import torch

import spion_fx
from spion_fx.kernels.attention import BlockLayout, block_sparse_attention_fwd

transformers = pytest.importorskip("transformers")

SEQ, BLOCK, BATCH = 256, 32, 2


# ------------------------------------------------------------------ CUDA kernel vs CPU kernel


def _inputs(b, h, h_kv, length, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, length, d, generator=gen)
    k = torch.randn(b, h_kv, length, d, generator=gen)
    v = torch.randn(b, h_kv, length, d, generator=gen)
    g = torch.randn(b, h, length, d, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v, g))


def _padding(b, length, device):
    kpm = torch.ones(b, length, dtype=torch.bool)
    kpm[-1, length - length // 3:] = False  # the last sample is padded for its final third
    return kpm.to(device)


def _layout(n_blocks, heads, seed=0):
    gen = torch.Generator().manual_seed(seed)
    grid = torch.rand(heads, n_blocks, n_blocks, generator=gen) < 0.35
    grid |= torch.eye(n_blocks, dtype=torch.bool)
    return BlockLayout.from_dense(grid, BLOCK)


def _op_outputs(q, k, v, g, layout, causal, kpm):
    """out, dq, dk, dv of the registered op on q's device (CUDA: Triton; CPU: the CPU kernel)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    lay = layout.to(q.device)
    out, _ = block_sparse_attention_fwd(
        *leaves, lay.kv_num_blocks, lay.kv_indices, lay.q_num_blocks, lay.q_indices, BLOCK,
        q.shape[-1] ** -0.5, causal, kpm, 0.0, torch.zeros((), dtype=torch.int64), False,
    )
    grads = torch.autograd.grad(out, leaves, g)
    return [out.detach(), *grads]


def _triton_outputs(q, k, v, g, layout, causal, kpm):
    """The Triton launchers directly (compiled on CUDA, interpreted on CPU)."""
    from spion_fx.kernels.attention.triton_attention import (
        triton_block_sparse_bwd,
        triton_block_sparse_fwd,
    )

    lay = layout.to(q.device)
    args = (lay.kv_num_blocks, lay.kv_indices, lay.q_num_blocks, lay.q_indices, BLOCK,
            q.shape[-1] ** -0.5, causal, kpm, 0.0, torch.zeros((), dtype=torch.int64), False)
    out, lse = triton_block_sparse_fwd(q, k, v, *args)
    return [out, *triton_block_sparse_bwd(g, q, k, v, out, lse, *args)]


def _assert_same(got, want, tol, kpm=None):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        assert torch.isfinite(a).all(), f"{name} not finite"
        scale = max(float(b.abs().max()), 1.0)
        err = float((a - b).abs().max()) / scale
        assert err <= tol, f"{name}: max error {err:.3g} (scaled) > {tol}"


CASES = [  # (heads, kv heads, causal, padding)
    pytest.param(4, 4, False, False, id="plain"),
    pytest.param(4, 2, True, True, id="gqa-causal-padding"),
    pytest.param(4, 1, False, True, id="mqa-padding"),
]


@pytest.mark.parametrize("h, h_kv, causal, padded", CASES)
def test_interpreted_triton_equals_cpu_kernel(h, h_kv, causal, padded):
    """CPU form of the CUDA check below: same comparison, Triton under the interpreter."""
    if torch.cuda.is_available():
        pytest.skip("on CUDA the gpu-marked test compares the compiled kernels")
    from spion_fx.kernels.attention import triton_attention

    if not triton_attention.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported")
    length, d = 96, 16
    q, k, v, g = _inputs(2, h, h_kv, length, d, torch.float32, "cpu")
    layout = _layout(length // BLOCK, 1)
    kpm = _padding(2, length, "cpu") if padded else None
    _assert_same(_triton_outputs(q, k, v, g, layout, causal, kpm),
                 _op_outputs(q, k, v, g, layout, causal, kpm), 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("h, h_kv, causal, padded", CASES)
def test_cuda_kernel_equals_cpu_kernel(h, h_kv, causal, padded, dtype):
    """The op on CUDA (Triton, registered at import) against the op on CPU (the CPU kernel) on
    the same values; the CPU side runs in float32 on the bf16-rounded inputs."""
    from spion_fx.kernels.attention.triton_registration import register_cuda_kernels

    assert register_cuda_kernels()
    length, d = 384, 64
    q, k, v, g = _inputs(2, h, h_kv, length, d, dtype, "cuda")
    layout = _layout(length // BLOCK, h)  # per-head patterns
    kpm = _padding(2, length, "cuda") if padded else None
    got = _op_outputs(q, k, v, g, layout, causal, kpm)
    want = _op_outputs(*(t.float().cpu() for t in (q, k, v, g)), layout, causal,
                       None if kpm is None else kpm.cpu())
    _assert_same(got, want, 3e-2 if dtype == torch.bfloat16 else 5e-3)  # bf16 / TF32 dots


# ---------------------------------------------------------------- training through the switch


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=128, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4, attn_pdrop=0.1,
        resid_pdrop=0.1, embd_pdrop=0.1, use_cache=False, attn_implementation="sdpa",
    )
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
        attention_dropout=0.1, use_cache=False, attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(cfg)


def _batch(step: int):
    gen = torch.Generator().manual_seed(step)
    ids = torch.randint(1, 128, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[-1, SEQ - 40:] = 0  # a padded sample: zeros at the end of the attention mask
    labels = ids.masked_fill(mask == 0, -100)
    return ids.cuda(), mask.cuda(), labels.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("build, inner", [(_gpt2, None), (_llama, "aot_eager")],
                         ids=["gpt2-inductor", "llama-gqa-aot_eager"])
def test_train_through_switch_on_cuda(build, inner, monkeypatch):
    torch.manual_seed(0)
    model = build().cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, inner=inner, block_size=BLOCK,
                      probe_interval=2, quantile=0.6, max_dense_steps=4)
    losses = []
    for step in range(8):
        ids, mask, labels = _batch(step)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert all(math.isfinite(x) for x in losses), losses
    state = model.spion_state
    sites = list(state.attention_sites())
    assert sites and all(s.phase == "sparse" for s in sites), [s.phase for s in sites]
    assert any(e["event"] == "switch" for e in state.events)
    assert any(not bool(s.pattern.all()) for s in sites), "patterns should be sparse"
    for p in model.parameters():
        assert torch.isfinite(p).all()

    # The sparse site's attention on CUDA equals the CPU kernel on the same inputs: the site
    # module itself (its layout buffers, causality, scale) against the CPU op with the site's
    # pattern. Dropout is switched off on the site for this call only: an SDPA site applies the
    # dropout_p it was traced with (HF retraces with 0 in eval), and the CPU kernel draws its
    # own keep mask, so only dropout-free outputs can be compared.
    site = sites[0]
    monkeypatch.setattr(site, "_dropout_p", lambda: 0.0)
    heads = model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    d = model.config.hidden_size // heads
    q, k, v, _ = _inputs(BATCH, heads, kv_heads, SEQ, d, torch.bfloat16, "cuda", seed=7)
    with torch.no_grad():
        got = site(q, k, v)
        layout = BlockLayout.from_dense(site.pattern.bool().cpu(), BLOCK)
        want, _ = block_sparse_attention_fwd(
            q.float().cpu(), k.float().cpu(), v.float().cpu(), layout.kv_num_blocks,
            layout.kv_indices, layout.q_num_blocks, layout.q_indices, BLOCK, d ** -0.5,
            site.causal, None, 0.0, torch.zeros((), dtype=torch.int64), False,
        )
    assert got.is_cuda and got.shape == want.shape
    scale = max(float(want.abs().max()), 1.0)
    assert float((got.float().cpu() - want).abs().max()) / scale <= 3e-2
