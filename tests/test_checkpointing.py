"""Sites inside activation-checkpointed blocks (lowering/checkpoint_regions.py).

Each test trains a checkpointed model and the same model (same weights) without checkpointing in
lockstep, on the same batches and RNG seeds: gradients must agree in the dense phase, on probe
steps and after the switch; probes and kernel calls must be counted once (the recomputation in
backward runs each site again but neither probes nor counts), and the block must really be
recomputed (each site's forward runs twice per step), not kept in memory.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import spion_fx
from spion_fx.lowering.checkpoint_regions import CheckpointRegion

SEQ, BLOCK, STEPS = 32, 8, 5
POLICY = dict(probe_interval=1, block_size=BLOCK, max_dense_steps=3)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class Block(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return x + self.proj(a.transpose(1, 2).reshape(b, n, d))


class Net(nn.Module):
    def __init__(self, checkpointing: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self.embed = nn.Linear(8, 32)
        self.blocks = nn.ModuleList([Block(dropout=dropout), Block(dropout=dropout)])

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            if self.checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x.pow(2).mean()


def _gpt2(checkpointing: dict | None, dropout: float = 0.0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64,
        attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout,
    )
    model = transformers.GPT2LMHeadModel(config)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(**checkpointing)
    return model.train()


def _sites(model) -> dict[str, nn.Module]:
    return {site.spec.name: site for site in spion_fx.get_state(model).attention_sites()}


def _lockstep(reference: nn.Module, checkpointed: nn.Module, loss_of, *, inner: str = "eager", steps: int = STEPS):
    """Train both models on the same data and seeds; compare gradients and probe statistics at
    every step. Returns the checkpointed model's sites and its site-forward count per step."""
    checkpointed.load_state_dict(reference.state_dict())
    models = (reference, checkpointed)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    for model, optimizer in zip(models, optimizers):
        spion_fx.sparsify(model, "spion-cf", optimizer=optimizer, inner=inner, **POLICY)
    calls = [0, 0]
    phases = []
    for step in range(steps):
        grads = []
        for i, model in enumerate(models):
            loss_of(model, torch.Generator().manual_seed(step), step).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            if step == 0:  # the sites exist after the first call
                for site in _sites(model).values():
                    site.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for name, grad in grads[0].items():
            torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name, s=step: f"step {s} {n}: {m}")
        ref, ckpt = _sites(reference), _sites(checkpointed)
        assert sorted(ckpt) == sorted(ref) and ckpt
        for name, site in ckpt.items():
            assert site.phase == ref[name].phase
            assert site.kernel_calls == ref[name].kernel_calls, (step, name)
            assert site.probed_batches == ref[name].probed_batches, (step, name)
            torch.testing.assert_close(site.probe_count, ref[name].probe_count)
        phases.append({site.phase for site in ckpt.values()})
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    assert phases[0] == {"dense"} and phases[-1] == {"sparse"}, phases
    return _sites(checkpointed), calls


def _gpt2_loss(model, data: torch.Generator, step: int):
    ids = torch.randint(0, 64, (2, SEQ), generator=data)
    torch.manual_seed(1000 + step)  # dropout draws the same in both models
    return model(input_ids=ids, labels=ids).loss


def _net_loss(model, data: torch.Generator, step: int):
    x = torch.randn(2, SEQ, 8, generator=data)
    torch.manual_seed(1000 + step)
    return model(x)


def _regions(model) -> list[CheckpointRegion]:
    state = spion_fx.get_state(model)
    return [m for r in state.graph_records for m in r.graph_module.modules() if isinstance(m, CheckpointRegion)]


@pytest.mark.parametrize("checkpointing", [{}, {"gradient_checkpointing_kwargs": {"use_reentrant": True}}],
                         ids=["default", "reentrant"])
def test_gpt2_gradient_checkpointing(checkpointing):
    reference, checkpointed = _gpt2(None), _gpt2(checkpointing)
    sites, calls = _lockstep(reference, checkpointed, _gpt2_loss)
    assert sorted(sites) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert all(site.phase == "sparse" and site.kernel_calls["sparse"] > 0 for site in sites.values())
    assert len(_regions(checkpointed)) == 2 and not _regions(reference)
    # recomputed in backward, not inlined: every site runs twice per step (probes once, above)
    assert calls[1] == 2 * calls[0] > 0


def test_gpt2_dropout_replays_in_recomputation():
    """With dropout, the checkpoint's recomputation must redraw the forward's masks (dense SDPA
    and the block-sparse kernel's seed both come from torch's RNG, which the checkpoint restores),
    or the gradients would differ from the non-checkpointed model's."""
    reference, checkpointed = _gpt2(None, dropout=0.1), _gpt2({}, dropout=0.1)
    sites, _ = _lockstep(reference, checkpointed, _gpt2_loss)
    assert all(site.kernel_calls["sparse"] > 0 for site in sites.values())


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_plain_module_checkpoint(inner):
    torch.manual_seed(0)
    reference = Net(checkpointing=False)
    checkpointed = copy.deepcopy(reference)
    checkpointed.checkpointing = True
    sites, calls = _lockstep(reference, checkpointed, _net_loss, inner=inner)
    assert sorted(sites) == ["blocks.0", "blocks.1"]
    assert all(site.phase == "sparse" and site.kernel_calls["sparse"] > 0 for site in sites.values())
    assert len(_regions(checkpointed)) == 2
    assert calls[1] == 2 * calls[0] > 0


def test_linear_sites_inside_a_checkpointed_block():
    """N:M linear sites in a checkpointed block are found and masked as outside one (the body
    holds no attention site: the region lowers the whole body at once)."""
    torch.manual_seed(0)
    reference = Net(checkpointing=False)
    checkpointed = copy.deepcopy(reference)
    checkpointed.checkpointing = True
    models = (reference, checkpointed)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    for model, optimizer in zip(models, optimizers):
        spion_fx.sparsify(model, "nm-2:4", optimizer=optimizer, inner="eager")
    for step in range(3):
        grads = []
        for model, optimizer in zip(models, optimizers):
            _net_loss(model, torch.Generator().manual_seed(step), step).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            optimizer.step()
            optimizer.zero_grad()
        for got, want in zip(*grads[::-1]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    linear = spion_fx.get_state(checkpointed).graph_records[0].linear_sites
    assert sorted(s.name for s in linear) == ["blocks.0.proj", "blocks.0.qkv", "blocks.1.proj", "blocks.1.qkv", "embed"]
    assert len(_regions(checkpointed)) == 2
