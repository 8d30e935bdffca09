"""A spion_fx checkpoint that is wrong says so (issue 19, item 4): truncated tensors, tensors of the
wrong shape or dtype, or a state from another policy raise a ValueError naming the key and what
was expected, both when the sites already exist and when the entries wait for the first forward;
nothing loads into a dense-looking model silently. Good checkpoints, and checkpoints from before
per-position probe counts and policy codes, still load."""

from __future__ import annotations

import copy

import pytest
import torch

import spion_fx
from spion_fx import zoo

pytest.importorskip("transformers")

POLICY = dict(inner="eager", block_size=8, probe_interval=2, quantile=0.6, filter_size=3, max_dense_steps=4)
SITE = "spion_state.attention.transformer__h__0__attn."


def _loss(model, kwargs):
    logits = model(**kwargs).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), kwargs["input_ids"].reshape(-1) % 64)


@pytest.fixture(scope="module")
def trained():
    """A tiny GPT-2 trained through the switch: (base model, inputs, its state_dict)."""
    torch.manual_seed(0)
    base, kwargs = zoo.build("gpt2", seq_len=32)
    model = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    spion_fx.sparsify(model, "spion-cf", optimizer=opt, **POLICY)
    for _ in range(5):
        _loss(model, kwargs).backward()
        opt.step()
        opt.zero_grad()
    assert all(s.phase == "sparse" for s in model.spion_state.attention_sites())
    return base, kwargs, {k: v.clone() for k, v in model.state_dict().items()}


def _fresh(base, kwargs, preset="spion-cf", built=True, **policy):
    model = copy.deepcopy(base).train()
    spion_fx.sparsify(model, preset, **{**POLICY, **policy})
    if built:
        with torch.no_grad():
            model.eval()(**kwargs)  # builds the sites
        model.train()
    return model


def _load_fails(base, kwargs, state, match, built=True):
    model = _fresh(base, kwargs, built=built)
    with pytest.raises(ValueError, match=match):
        model.load_state_dict(state)
        with torch.no_grad():
            model.eval()(**kwargs)  # deferred entries are checked when their site appears


def _edited(state, key, value=None, drop=False):
    state = dict(state)
    if drop:
        del state[key]
    else:
        state[key] = value
    return state


def test_a_good_checkpoint_loads_before_and_after_the_sites_exist(trained):
    base, kwargs, state = trained
    for built in (True, False):
        model = _fresh(base, kwargs, built=built)
        model.load_state_dict(state)
        with torch.no_grad():
            model.eval()(**kwargs)
        assert all(s.phase == "sparse" for s in model.spion_state.attention_sites())


def test_an_old_checkpoint_without_probe_counts_or_policy_code_loads(trained):
    base, kwargs, state = trained
    old = {k: v for k, v in state.items() if not k.endswith(("probe_count", "policy_code"))}
    model = _fresh(base, kwargs)
    model.load_state_dict(old)
    site = next(iter(model.spion_state.attention_sites()))
    assert site.probe_count.numel() == max(site.probe_frame) or site.probe_frame == (0, 0)


@pytest.mark.parametrize("built", [True, False], ids=["sites-built", "sites-deferred"])
@pytest.mark.parametrize(
    "case, key, match",
    [
        ("missing", "probe_stats", r"transformer\.h\.0\.attn.*lacks .*probe_stats"),
        ("dtype", "pattern", r"'transformer\.h\.0\.attn'.*pattern' is of dtype torch\.float32, expected a bool"),
        ("shape", "probe_stats", r"probe_stats' is of shape \(2,\), expected shape \(3,\)"),
        ("truncated", "pattern", r"pattern.*blocks for length 32"),
        ("empty", "pattern", r"pattern' is empty .* for a sparse site"),
        ("per_head", "previous_map", r"previous_map' is of shape \(2, 32, 32\), expected \[Lq, Lk\] \(per_head=False\)"),
        ("counts", "probe_count", r"probe_count' is of shape \(7,\), expected \[32\]"),
        ("phase", "phase_code", r"phase_code' is 7, expected 0 \(dense\) or 1 \(sparse\)"),
    ],
)
def test_a_wrong_site_entry_names_the_key(trained, case, key, match, built):
    base, kwargs, state = trained
    full = SITE + key
    value = state.get(full)
    if case == "missing":
        bad = _edited(state, full, drop=True)
    elif case == "dtype":
        bad = _edited(state, full, value.float())
    elif case == "shape":
        bad = _edited(state, full, value[:2])
    elif case == "truncated":
        bad = _edited(state, full, value[:, :-1])
    elif case == "empty":
        bad = _edited(state, full, value[:, :0, :0])
    elif case == "per_head":
        bad = _edited(state, full, torch.stack([value, value]))
    elif case == "counts":
        bad = _edited(_edited(state, SITE + "probe_accum", torch.zeros(32, 32)), full, torch.zeros(7, dtype=torch.float64))
    else:
        bad = _edited(state, full, torch.tensor(7))
    _load_fails(base, kwargs, bad, match, built=built)


@pytest.mark.parametrize("preset", ["dense", "nm-2:4"])
def test_a_checkpoint_of_another_policy_is_refused_at_load(trained, preset):
    """Never into a dense-looking model silently: the entries would wait for sites that never come."""
    base, kwargs, state = trained
    model = copy.deepcopy(base).train()
    spion_fx.sparsify(model, preset, inner="eager")
    with pytest.raises(ValueError, match=r"spion_state\.policy_code.*attention method 'spion'.*"
                                         r"this model is sparsified with attention method 'dense'"):
        model.load_state_dict(state)


def test_a_dense_checkpoint_is_refused_by_a_spion_model(trained):
    base, kwargs, _ = trained
    dense = copy.deepcopy(base)
    spion_fx.sparsify(dense, "nm-2:4", inner="eager")
    model = _fresh(base, kwargs, built=False)
    with pytest.raises(ValueError, match=r"linear method 'srste' 2:4.*sparsified with attention method 'spion'"):
        model.load_state_dict(dense.state_dict(), strict=False)
