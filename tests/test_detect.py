"""Detection of attention and linear sites on small plain-PyTorch modules captured with Dynamo."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spion_fx.capture import capture
from spion_fx.passes.detect import detect_sites
from spion_fx.passes.detect_attention import find_attention_sites
from spion_fx.passes.detect_linear import find_linear_sites
from spion_fx.passes.sites import AttentionSite, LinearSite

B, H, L, D = 2, 4, 8, 16


def qkv(q_len: int = L, kv_len: int = L, heads: int = H, kv_heads: int = H) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(B, heads, q_len, D, generator=g),
        torch.randn(B, kv_heads, kv_len, D, generator=g),
        torch.randn(B, kv_heads, kv_len, D, generator=g),
    )


def node_values(gm: torch.fx.GraphModule, inputs: list) -> dict[torch.fx.Node, object]:
    """Every node's value for one run of `gm`."""
    env: dict[torch.fx.Node, object] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            env[n] = super().run_node(n)
            return env[n]

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return env


def site_reference(site: AttentionSite, env: dict) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v computed from the site's fields alone (float64)."""
    q, k, v = (env[n].double() for n in (site.q, site.k, site.v))
    if site.enable_gqa:
        k, v = (t.repeat_interleave(site.gqa_ratio, dim=-3) for t in (k, v))
    if site.scale is None:
        scale = q.shape[-1] ** -0.5
    else:
        scale = float(env[site.scale]) if isinstance(site.scale, torch.fx.Node) else site.scale
        scale = 1.0 / scale if site.scale_is_divisor else scale
    s = q @ k.transpose(-1, -2) * scale
    fill = site.mask_fill_value if site.mask_fill_value is not None else float("-inf")
    if site.mask_kind == "additive":
        s = s + sum((env[m].double() for m in [site.mask, *site.extra_masks]), torch.zeros(()))
    elif site.mask_kind == "bool_keep":
        s = s.masked_fill(~env[site.mask], fill)
    elif site.mask_kind == "bool_fill":
        s = s.masked_fill(env[site.mask], fill)
    if site.is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def assert_sites_exact(gm: torch.fx.GraphModule, inputs: list, attention: list[AttentionSite]) -> None:
    """Each site's recorded fields reproduce the value the graph computes at its output."""
    env = node_values(gm, inputs)
    for site in attention:
        if site.dropout_p > 0:
            continue  # random: nothing to compare against
        got = env[site.output].double()
        torch.testing.assert_close(got, site_reference(site, env), atol=1e-4, rtol=1e-4, msg=site.name)


def sites(module: nn.Module, *args: torch.Tensor) -> tuple[list[AttentionSite], list[LinearSite]]:
    result = capture(module, args)
    assert result.num_graphs == 1, result.graph_breaks
    graph = result.graphs[0]
    attention, linear = detect_sites(graph)
    assert_sites_exact(graph.graph_module, graph.example_inputs, attention)
    return attention, linear


def one_attention(module: nn.Module, *args: torch.Tensor) -> AttentionSite:
    attention, _ = sites(module, *args)
    assert len(attention) == 1, attention
    return attention[0]


def placeholder_of(node: torch.fx.Node) -> str:
    assert node.op == "placeholder", node
    return node.target.lower()


class Fn(nn.Module):
    """Wraps a function of tensors as a module (captures see it as the root's forward)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


# ---------------------------------------------------------------------------------------------
# SDPA


def test_sdpa_plain():
    site = one_attention(Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v)), *qkv())
    assert site.form == "sdpa" and site.nodes == [site.output]
    assert (placeholder_of(site.q), placeholder_of(site.k), placeholder_of(site.v)) == ("l_args_0_", "l_args_1_", "l_args_2_")
    assert site.mask is None and site.mask_kind == "none"
    assert site.scale is None and not site.is_causal and site.dropout_p == 0.0
    assert (site.num_heads, site.num_kv_heads, site.head_dim, site.q_len, site.kv_len) == (H, H, D, L, L)
    assert site.rank == 4 and not site.enable_gqa and not site.cross_attention


@pytest.mark.parametrize("dtype,kind", [(torch.bool, "bool_keep"), (torch.float32, "additive")])
def test_sdpa_mask_kinds(dtype, kind):
    mask = torch.ones(B, 1, L, L).tril().to(dtype)
    site = one_attention(Fn(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)), *qkv(), mask)
    assert site.mask_kind == kind and placeholder_of(site.mask) == "l_args_3_"


def test_sdpa_causal_scale_dropout():
    fn = Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True, scale=0.5))
    site = one_attention(fn, *qkv())
    assert site.is_causal and site.scale == 0.5 and site.dropout_p == 0.25
    assert not site.dropout_train_only  # SDPA applies dropout_p whenever called


def test_sdpa_enable_gqa():
    fn = Fn(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    site = one_attention(fn, *qkv(kv_heads=2))
    assert site.enable_gqa and (site.num_heads, site.num_kv_heads) == (H, 2) and site.gqa_ratio == 2


def test_sdpa_repeat_interleave_kv_is_recorded_as_gqa():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))

    site = one_attention(Fn(fn), *qkv(kv_heads=2))
    assert site.enable_gqa and site.num_kv_heads == 2 and len(site.kv_repeat_nodes) == 2
    assert placeholder_of(site.k) == "l_args_1_" and placeholder_of(site.v) == "l_args_2_"


def test_sdpa_aten_spelling():
    fn = Fn(lambda q, k, v: torch.ops.aten.scaled_dot_product_attention(q, k, v, is_causal=True))
    site = one_attention(fn, *qkv())
    assert site.form == "sdpa" and site.is_causal


class Projected(nn.Module):
    """q from x, k/v from `memory` through their own projections (cross when memory is not x)."""

    def __init__(self, eager: bool = False):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(32, 32) for _ in range(3))
        self.eager = eager

    def split(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], H, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(memory)), self.split(self.v(memory))
        if not self.eager:
            return F.scaled_dot_product_attention(q, k, v)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


@pytest.mark.parametrize("eager", [False, True])
def test_cross_attention_by_length(eager):
    x, memory = torch.randn(B, L, 32), torch.randn(B, 12, 32)
    site = one_attention(Projected(eager), x, memory)
    assert site.cross_attention and (site.q_len, site.kv_len) == (L, 12)


@pytest.mark.parametrize("eager", [False, True])
def test_cross_attention_by_source_with_equal_lengths(eager):
    x, memory = torch.randn(B, L, 32), torch.randn(B, L, 32)
    assert one_attention(Projected(eager), x, memory).cross_attention


class SelfProjected(Projected):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, x)


def test_self_attention_is_not_cross():
    assert not one_attention(SelfProjected(eager=True), torch.randn(B, L, 32)).cross_attention


# ---------------------------------------------------------------------------------------------
# Eager


def hf_eager(q, k, v, mask):
    w = torch.matmul(q, k.transpose(2, 3)) * 0.25
    w = w + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    w = F.dropout(w, p=0.0, training=False)
    return torch.matmul(w, v)


def test_eager_hf_style_mul_scale_additive_mask_dropout():
    mask = torch.zeros(B, 1, L, L)
    site = one_attention(Fn(hf_eager), *qkv(), mask)
    assert site.form == "eager"
    assert placeholder_of(site.k) == "l_args_1_"  # the node before the transpose
    assert site.mask_kind == "additive" and placeholder_of(site.mask) == "l_args_3_"
    assert site.scale == 0.25 and not site.scale_is_divisor and not site.is_causal
    assert site.dropout_p == 0.0 and site.dropout_train_only
    ops = [n.target if n.op == "call_method" else getattr(n.target, "__name__", "") for n in site.nodes]
    assert ops == ["transpose", "matmul", "mul", "add", "softmax", "to", "dropout", "matmul"]
    assert site.output is site.nodes[-1]
    assert site.softmax_dtype is torch.float32  # read once by detection, carried on the site


def test_softmax_dtype_read_in_every_spelling():
    def positional(q, k, v):
        return torch.softmax(q @ k.mT, -1, torch.float64).to(q.dtype) @ v

    assert one_attention(Fn(positional), *qkv()).softmax_dtype is torch.float64
    assert one_attention(Fn(lambda q, k, v: torch.softmax(q @ k.mT, -1) @ v), *qkv()).softmax_dtype is None
    assert one_attention(Fn(F.scaled_dot_product_attention), *qkv()).softmax_dtype is None


def test_op_view_reads_einsum_without_detection_imported():
    """Every spelling is declared in op_view: the census sees einsum whatever was imported first."""
    import subprocess
    import sys

    code = (
        "import torch; from spion_fx.passes.attention_census import attention_like_ops\n"
        "gm = torch.fx.symbolic_trace(lambda a, b: torch.einsum('ij,jk->ik', a, b))\n"
        "print(attention_like_ops(gm))\n"
        "import sys; assert 'spion_fx.passes.detect_attention' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "einsum 'ij,jk->ik'" in out.stdout


def test_eager_div_by_constant_records_reciprocal():
    fn = Fn(lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1) @ v)
    site = one_attention(fn, *qkv())
    assert site.scale == pytest.approx(1 / math.sqrt(D)) and site.mask is None


class TensorScale(nn.Module):
    def __init__(self, divide: bool):
        super().__init__()
        self.divide = divide
        self.register_buffer("temperature", torch.tensor(3.0))

    def forward(self, q, k, v):
        s = q @ k.transpose(-1, -2)
        s = s / self.temperature if self.divide else s * self.temperature
        return s.softmax(-1) @ v


@pytest.mark.parametrize("divide", [False, True])
def test_eager_scale_by_tensor(divide):
    site = one_attention(TensorScale(divide), *qkv())
    assert isinstance(site.scale, torch.fx.Node) and site.scale_is_divisor == divide


def test_eager_masked_fill_is_bool_fill():
    def fn(q, k, v, masked):
        s = (q @ k.transpose(-1, -2)).masked_fill(masked, float("-inf"))
        return F.softmax(s, dim=-1) @ v

    masked = torch.ones(L, L, dtype=torch.bool).triu(1)
    site = one_attention(Fn(fn), *qkv(), masked)
    assert site.mask_kind == "bool_fill" and site.mask_fill_value == float("-inf") and site.scale == 1.0


@pytest.mark.parametrize("keep_first", [True, False])
def test_eager_where_mask(keep_first):
    def fn(q, k, v, cond):
        s = q @ k.transpose(-1, -2) * 0.5
        s = torch.where(cond, s, -1e9) if keep_first else torch.where(cond, -1e9, s)
        return F.softmax(s, dim=-1) @ v

    cond = torch.ones(B, 1, 1, L, dtype=torch.bool)
    site = one_attention(Fn(fn), *qkv(), cond)
    assert site.mask_kind == ("bool_keep" if keep_first else "bool_fill") and site.mask_fill_value == -1e9


@pytest.mark.parametrize(
    "spell",
    [
        lambda k: k.transpose(-1, -2),
        lambda k: k.transpose(-2, -1),
        lambda k: k.transpose(2, 3),
        lambda k: torch.transpose(k, 3, 2),
        lambda k: k.permute(0, 1, 3, 2),
        lambda k: k.mT,
    ],
    ids=["t(-1,-2)", "t(-2,-1)", "t(2,3)", "torch.transpose(3,2)", "permute", "mT"],
)
def test_eager_key_transpose_spellings(spell):
    site = one_attention(Fn(lambda q, k, v: torch.softmax(torch.matmul(q, spell(k)), -1) @ v), *qkv())
    assert placeholder_of(site.k) == "l_args_1_"


def test_eager_softmax_upcast_and_downcast():
    def fn(q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2))
        return torch.matmul(F.softmax(s.float(), dim=-1).type_as(q), v)

    one_attention(Fn(fn), *qkv())


def test_eager_reversed_operands_and_cast_after_dropout():
    def fn(q, k, v, mask):
        s = mask + 0.25 * torch.matmul(q, k.transpose(-1, -2))
        p = F.dropout(F.softmax(s.float(), dim=-1), p=0.0, training=False).to(v.dtype)
        return p @ v

    site = one_attention(Fn(fn), *qkv(), torch.randn(B, 1, 1, L))
    assert site.scale == 0.25 and site.mask_kind == "additive"


class TrainingDropout(nn.Module):
    def forward(self, q, k, v):
        p = F.softmax(q @ k.mT * 0.25, dim=-1)
        return F.dropout(p, p=0.1, training=self.training) @ v


def test_eager_dropout_in_training():
    site = one_attention(TrainingDropout().train(), *qkv())
    assert site.dropout_p == 0.1 and site.dropout_train_only


def test_eager_additive_bias_then_mask_records_extra_masks():
    def fn(q, k, v, bias, mask):
        return torch.softmax(q @ k.transpose(-1, -2) + bias + mask, dim=-1) @ v

    site = one_attention(Fn(fn), *qkv(), torch.randn(1, H, L, L), torch.zeros(B, 1, 1, L))
    assert placeholder_of(site.mask) == "l_args_3_" and [placeholder_of(m) for m in site.extra_masks] == ["l_args_4_"]


def test_eager_bmm_3d_with_heads_folded_from_4d():
    def fn(q, k, v):
        q3, k3, v3 = (t.reshape(B * H, t.shape[2], D) for t in (q, k, v))
        return torch.bmm(torch.softmax(torch.bmm(q3, k3.transpose(1, 2)) * 0.25, dim=-1), v3)

    site = one_attention(Fn(fn), *qkv())
    assert site.rank == 3 and site.num_heads == H and site.head_dim == D and site.q_len == L


@pytest.mark.parametrize("with_mask", [False, True])
def test_eager_baddbmm(with_mask):
    def fn(q3, k3, v3, mask):
        if with_mask:
            s = torch.baddbmm(mask, q3, k3.transpose(1, 2), beta=1.0, alpha=0.25)
        else:
            s = torch.baddbmm(torch.empty(B * H, L, L), q3, k3.transpose(1, 2), beta=0.0, alpha=0.25)
        return torch.bmm(F.softmax(s, dim=-1), v3)

    q, k, v = (t.reshape(B * H, L, D) for t in qkv())
    site = one_attention(Fn(fn), q, k, v, torch.zeros(B * H, L, L))
    assert site.rank == 3 and site.num_heads is None  # the fold into B*H is not in this graph
    assert site.scale == 0.25
    assert site.mask_kind == ("additive" if with_mask else "none")


class MHAStyle(nn.Module):
    """nn.MultiheadAttention-style: [L, B, E] -> view(L, B*H, D).transpose(0, 1) -> bmm."""

    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        q, k, v = (t.contiguous().view(L, B * H, 32 // H).transpose(0, 1) for t in (q, k, v))
        attn = torch.softmax(torch.bmm(q * (32 // H) ** -0.5, k.transpose(-2, -1)), dim=-1)
        return torch.bmm(attn, v)


def test_eager_mha_style_3d_knows_heads():
    site = one_attention(MHAStyle(), torch.randn(L, B, 32))
    assert site.rank == 3 and site.num_heads == H and site.head_dim == 32 // H
    assert site.scale == 1.0  # q was scaled before the matmul: the chain itself has no scale


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def test_eager_gqa_through_repeat_kv():
    def fn(q, k, v):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        return torch.matmul(F.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.25, dim=-1), v)

    site = one_attention(Fn(fn), *qkv(kv_heads=2))
    assert site.enable_gqa and (site.num_heads, site.num_kv_heads) == (H, 2)
    assert placeholder_of(site.k) == "l_args_1_" and len(site.kv_repeat_nodes) == 6


class TwoCalls(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v) + torch.softmax(q @ k.mT, -1) @ v


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([TwoCalls(), TwoCalls()])

    def forward(self, q, k, v):
        return self.blocks[1](self.blocks[0](q, k, v), k, v)


def test_names_are_module_paths_made_unique():
    attention, _ = sites(Stack(), *qkv())
    assert [s.name for s in attention] == ["blocks.0", "blocks.0#1", "blocks.1", "blocks.1#1"]
    assert [s.form for s in attention] == ["sdpa", "eager", "sdpa", "eager"]


# ---------------------------------------------------------------------------------------------
# einsum


EINSUM_FORMS = {
    "bhld,bhmd": lambda q, k, v: torch.einsum(
        "bhlm,bhmd->bhld", torch.softmax(torch.einsum("bhld,bhmd->bhlm", q, k) * 0.25, -1), v),
    "other letters": lambda q, k, v: torch.einsum(
        "nhij,nhjc->nhic", torch.softmax(torch.einsum("nhic,nhjc->nhij", q, k) * 0.25, -1), v),
    "operands swapped": lambda q, k, v: torch.einsum(
        "bhmd,bhlm->bhld", v, torch.softmax(torch.einsum("bhmd,bhld->bhlm", k, q) * 0.25, -1)),
    "transposed key": lambda q, k, v: torch.einsum(
        "bhlm,bhmd->bhld", torch.softmax(torch.einsum("bhld,bhdm->bhlm", q, k.transpose(-1, -2)) * 0.25, -1), v),
    "ellipsis": lambda q, k, v: torch.einsum(
        "...lm,...md->...ld", torch.softmax(torch.einsum("...ld,...md->...lm", q, k) * 0.25, -1), v),
    "spaces, einsum scores with matmul output": lambda q, k, v: torch.softmax(
        torch.einsum("b h l d, b h m d -> b h l m", q, k) * 0.25, -1) @ v,
}


@pytest.mark.parametrize("fn", list(EINSUM_FORMS.values()), ids=list(EINSUM_FORMS))
def test_einsum_4d_forms(fn):
    site = one_attention(Fn(fn), *qkv())
    assert site.form == "eager" and site.scale == 0.25 and site.rank == 4
    assert (placeholder_of(site.q), placeholder_of(site.k), placeholder_of(site.v)) == ("l_args_0_", "l_args_1_", "l_args_2_")
    assert site.output.target is torch.einsum or site.output.target is torch.matmul or "matmul" in str(site.output.target)


def test_einsum_3d_with_mask_and_dropout():
    def fn(q, k, v, mask):
        s = torch.einsum("bld,bmd->blm", q, k) / math.sqrt(D) + mask
        return torch.einsum("blm,bmd->bld", F.dropout(F.softmax(s, dim=-1), p=0.0, training=False), v)

    q, k, v = (t.reshape(B * H, L, D) for t in qkv())
    site = one_attention(Fn(fn), q, k, v, torch.zeros(B * H, 1, L))
    assert site.rank == 3 and site.mask_kind == "additive" and site.scale == pytest.approx(D ** -0.5)
    assert [n.target for n in site.nodes][0] is torch.einsum and site.nodes[-1] is site.output


def _dims_swapped(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-1, -2).contiguous()


# (function, which inputs arrive with their last two dims swapped)
EINSUM_NEGATIVES = {
    "q and k stored [.., D, L]": (lambda q, k, v: torch.einsum(
        "bhlm,bhmd->bhld", torch.softmax(torch.einsum("bhdl,bhdm->bhlm", q, k), -1), v), "qk"),
    "transposed scores": (lambda q, k, v: torch.einsum(
        "bhml,bhmd->bhld", torch.softmax(torch.einsum("bhld,bhmd->bhml", q, k), -1), v), ""),
    "batch dims permuted": (lambda q, k, v: torch.einsum(
        "bhlm,bhmd->bhld", torch.softmax(torch.einsum("bhld,hbmd->bhlm", q, k.transpose(0, 1)), -1), v), ""),
    "key given transposed without a transpose node": (lambda q, k, v: torch.einsum(
        "bhlm,bhmd->bhld", torch.softmax(torch.einsum("bhld,bhdm->bhlm", q, k), -1), v), "k"),
    "value product over the query dim": (lambda q, k, v: torch.einsum(
        "bhlm,bhld->bhmd", torch.softmax(torch.einsum("bhld,bhmd->bhlm", q, k), -1), v), ""),
    "three operands": (lambda q, k, v: torch.einsum(
        "bhlm,bhmd,bhmd->bhld", torch.softmax(torch.einsum("bhld,bhmd->bhlm", q, k), -1), v, v), ""),
    "list of operands": (lambda q, k, v: torch.einsum(
        "bhlm,bhmd->bhld", [torch.softmax(torch.einsum("bhld,bhmd->bhlm", [q, k]), -1), v]), ""),
}


@pytest.mark.parametrize("case", list(EINSUM_NEGATIVES.values()), ids=list(EINSUM_NEGATIVES))
def test_einsum_not_attention(case):
    fn, swapped = case
    q, k, v = (_dims_swapped(t) if name in swapped else t for name, t in zip("qkv", qkv()))
    attention, _ = sites(Fn(fn), q, k, v)
    assert attention == []


# ---------------------------------------------------------------------------------------------
# Not attention (or not exactly readable): never a site


NEGATIVES = {
    "softmax over dim -2": lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v,
    "scale after mask": lambda q, k, v: torch.softmax((q @ k.mT + 1.0 * v.sum()) * 0.5, -1) @ v,
    "per-head scale tensor": lambda q, k, v: torch.softmax(q @ k.mT * torch.ones(1, H, 1, 1), -1) @ v,
    "probs observed elsewhere": lambda q, k, v: ((p := torch.softmax(q @ k.mT, -1)) @ v, p.sum()),
    "scores used twice": lambda q, k, v: torch.softmax(s := q @ k.mT, -1) @ v + s.sum(),
    "softmax(probs) @ v with v on the left": lambda q, k, v: v.transpose(-1, -2) @ torch.softmax(q @ k.mT, -1),
    "mask derived from the scores": lambda q, k, v: torch.softmax((s := q @ k.mT) + (s > 0).float(), -1) @ v,
}


@pytest.mark.parametrize("fn", list(NEGATIVES.values()), ids=list(NEGATIVES))
def test_not_attention(fn):
    attention, _ = sites(Fn(fn), *qkv())
    assert attention == []


def test_key_transposed_on_other_dims_is_not_matched():
    # k arrives as [B, S, D, H]; transpose(1, 3) gives [B, H, D, S]: a valid product, but the
    # recorded k would not be a [B, H, S, D] tensor in the graph.
    q, _, v = qkv()
    k_bsdh = torch.randn(B, L, D, H)
    attention, _ = sites(Fn(lambda q, k, v: torch.softmax(q @ k.transpose(1, 3), -1) @ v), q, k_bsdh, v)
    assert attention == []


def test_in_place_masked_fill_is_not_matched():
    def fn(q, k, v, masked):
        s = q @ k.transpose(-1, -2)
        s.masked_fill_(masked, float("-inf"))
        return torch.softmax(s, -1) @ v

    attention, _ = sites(Fn(fn), *qkv(), torch.ones(L, L, dtype=torch.bool).triu(1))
    assert attention == []


# ---------------------------------------------------------------------------------------------
# Linear


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight stored [in, out], computed with addmm."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


class LinearForms(nn.Module):
    def __init__(self):
        super().__init__()
        self.with_bias = nn.Linear(32, 48)
        self.no_bias = nn.Linear(48, 32, bias=False)
        self.conv = Conv1D(32, 64)
        self.w_in_out = nn.Parameter(torch.randn(64, 16))
        self.w_out_in = nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        y = self.no_bias(self.with_bias(x))
        y = self.conv(y) @ self.w_in_out
        return torch.matmul(y, self.w_out_in.t())


def test_linear_forms():
    _, linear = sites(LinearForms(), torch.randn(B, L, 32))
    by_name = {(s.name, s.weight_name): s for s in linear}
    wb = by_name[("with_bias", "with_bias.weight")]
    assert wb.form == "linear" and wb.bias is not None and wb.weight_shape == (48, 32)
    assert (wb.in_features, wb.out_features) == (32, 48) and not wb.weight_transposed
    nb = by_name[("no_bias", "no_bias.weight")]
    assert nb.form == "linear" and nb.bias is None
    conv = by_name[("conv", "conv.weight")]
    assert conv.form == "addmm" and conv.weight_transposed and (conv.in_features, conv.out_features) == (32, 64)
    assert conv.bias is not None and conv.weight.op == "placeholder"
    root = [s for s in linear if s.name == ""]
    assert {(s.weight_name, s.form, s.weight_transposed) for s in root} == {
        ("w_in_out", "matmul", True), ("w_out_in", "matmul", False)}
    assert {s.role for s in linear} == {"linear"} and len(linear) == 5


class TinyLM(nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.body = nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, 100, bias=False)
        self.tied = tied

    def forward(self, ids):
        h = self.body(self.embed(ids))
        return F.linear(h, self.embed.weight) if self.tied else self.lm_head(h)


class TiedHeadOtherName(TinyLM):
    def __init__(self):
        super().__init__(tied=True)
        self.unembed = nn.Linear(32, 100, bias=False)
        self.unembed.weight = self.embed.weight

    def forward(self, ids):
        return self.unembed(self.body(self.embed(ids)))


@pytest.mark.parametrize("model", [TinyLM(tied=True), TinyLM(tied=False), TiedHeadOtherName()],
                         ids=["tied-functional", "named-lm_head", "tied-module"])
def test_embedding_and_lm_head(model):
    _, linear = sites(model, torch.randint(0, 100, (B, L)))
    roles = {s.role: s for s in linear}
    assert sorted(s.role for s in linear) == ["embedding", "linear", "lm_head"]
    emb = roles["embedding"]
    assert emb.form == "embedding" and emb.weight_name == "embed.weight" and emb.weight_shape == (100, 32)
    head = roles["lm_head"]
    assert head.form == "linear" and head.out_features == 100
    if isinstance(model, TiedHeadOtherName) or model.tied:
        assert head.weight is emb.weight


class ComputedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(32, 32))
        self.register_buffer("mask", torch.ones(32, 32))
        self.register_buffer("frozen", torch.randn(32, 32))

    def forward(self, x):
        y = F.linear(x, self.weight * self.mask)  # computed from a parameter: not a site
        y = y @ self.frozen  # a buffer is not a weight
        return F.linear(y, x[0, :32])  # data as weight


def test_computed_or_buffer_weight_is_not_a_site():
    _, linear = sites(ComputedWeights(), torch.randn(B, 32, 32))
    assert linear == []


def test_detect_sites_accepts_graph_module_and_names():
    result = capture(SelfProjected(eager=True), (torch.randn(B, L, 32),))
    graph = result.graphs[0]
    attention, linear = detect_sites(graph.graph_module, graph.param_names)
    assert len(attention) == 1 and len(linear) == 3
    assert find_attention_sites(graph.graph_module, graph.param_names)[0].output is attention[0].output
    assert [s.weight_name for s in find_linear_sites(graph.graph_module, graph.param_names)] == [
        "q.weight", "k.weight", "v.weight"]


def test_dynamic_shapes_keep_sites_with_unknown_lengths():
    # After a recompile with dynamic shapes, sizes are symbolic: sites are still found, their
    # sizes are unknown (None) rather than the example's, and nothing is specialized.
    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v) + torch.softmax(q @ k.mT * 0.25 + mask, -1) @ v

    args = (*qkv(), torch.zeros(B, 1, 1, L))
    graph = capture(Fn(fn), args, dynamic=True).graphs[0]
    attention, _ = detect_sites(graph)
    assert [s.form for s in attention] == ["sdpa", "eager"]
    assert all(s.q_len is None and s.kv_len is None and s.num_heads is None for s in attention)
    inputs = [a for a in graph.example_inputs if isinstance(a, torch.Tensor)]
    assert len(inputs) < len(graph.example_inputs)  # the sizes themselves are graph inputs
    assert_sites_exact(graph.graph_module, graph.example_inputs, attention)
