"""Attention mass kept and the coverage variant (spion-p): known answers on synthetic maps, the
greedy's minimality, the density cap, and the report's figure against a direct float64 sum."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spion_fx
from spion_fx import zoo
from spion_fx.runtime.coverage import (
    block_mass,
    coverage_pattern,
    fewest_blocks_for_mass,
    mass_kept,
)
from spion_fx.runtime.pattern import generate_pattern, pattern_density

PROPS = settings(max_examples=25, deadline=None)


def _map_with_mass_in(blocks: set[tuple[int, int]], nb: int, b: int, *, causal: bool, share: float = 0.9) -> torch.Tensor:
    """Row-stochastic [nb*b, nb*b] map: each query row puts `share` of its mass, evenly, on the
    keys of the listed blocks of its block row and on its diagonal block, the rest spread
    evenly over every key it may see (all keys, or keys <= itself when causal)."""
    length = nb * b
    rows = []
    for i in range(length):
        visible = torch.zeros(length, dtype=torch.float64)
        visible[: i + 1 if causal else length] = 1.0
        target = torch.zeros(length, dtype=torch.float64)
        block_row = i // b
        for bi, bj in blocks | {(block_row, block_row)}:
            if bi == block_row:
                target[bj * b : (bj + 1) * b] = 1.0
        target *= visible
        rows.append(share * target / target.sum() + (1 - share) * visible / visible.sum())
    return torch.stack(rows)


def _dense(pattern: torch.Tensor, b: int) -> torch.Tensor:
    return pattern.repeat_interleave(b, -2).repeat_interleave(b, -1)


def _direct_share(attn: torch.Tensor, pattern: torch.Tensor, b: int) -> float:
    """Float64 reference: the map's entries under the upsampled pattern over all its entries."""
    a = attn.double()
    keep = _dense(pattern.bool(), b)[..., : a.shape[-1], : a.shape[-1]]
    return float((a * keep).sum() / a.sum())


# --------------------------------------------------------------------------------------------
# known answers
# --------------------------------------------------------------------------------------------

NB, B = 8, 4
FAR = {(5, 0), (6, 2), (7, 1), (3, 1)}  # strictly below the diagonal: valid causal and not


@pytest.mark.parametrize("causal", [False, True])
def test_coverage_keeps_exactly_the_blocks_holding_the_mass(causal):
    attn = _map_with_mass_in(FAR, NB, B, causal=causal)
    pattern = generate_pattern(attn, block_size=B, variant="p", coverage=0.88, causal=causal)
    expected = torch.eye(NB, dtype=torch.bool)
    for i, j in FAR:
        expected[i, j] = True
    assert torch.equal(pattern, expected)
    kept, _ = mass_kept(attn, pattern, B)
    assert kept >= 0.88


@pytest.mark.parametrize("causal", [False, True])
def test_per_head_patterns_follow_each_heads_mass(causal):
    other = {(4, 3), (7, 5)}
    attn = torch.stack([_map_with_mass_in(FAR, NB, B, causal=causal), _map_with_mass_in(other, NB, B, causal=causal)])
    pattern = generate_pattern(attn, block_size=B, variant="p", coverage=0.88, causal=causal, per_head=True)
    for head, blocks in enumerate((FAR, other)):
        expected = torch.eye(NB, dtype=torch.bool)
        for i, j in blocks:
            expected[i, j] = True
        assert torch.equal(pattern[head], expected)
    # One layer pattern for both heads: built from their mean, it takes blocks of the union only.
    shared = generate_pattern(attn, block_size=B, variant="p", coverage=0.88, causal=causal)
    assert not (shared & ~(pattern[0] | pattern[1])).any()
    assert mass_kept(attn, shared, B)[0] >= 0.88


def test_causal_never_keeps_or_counts_a_block_above_the_diagonal():
    # Mass sits above the diagonal (a non-causal map): causal=True may not take it.
    attn = _map_with_mass_in({(0, 7), (1, 6), (6, 1)}, NB, B, causal=False)
    pattern = generate_pattern(attn, block_size=B, variant="p", coverage=0.99, causal=True)
    assert not pattern.triu(1).any()
    assert pattern[6, 1] and pattern.diagonal().all()
    lower = block_mass(attn, B)[0] * torch.ones(NB, NB).tril()  # what a causal pattern may keep
    assert float((lower * pattern).sum()) >= 0.99 * float(lower.sum())


def test_max_density_caps_the_pattern():
    attn = torch.softmax(torch.zeros(64, 64, dtype=torch.float64), -1)  # uniform: needs everything
    full = generate_pattern(attn, block_size=B, variant="p", coverage=1.0)
    assert full.all()
    for cap, causal in [(0.25, False), (0.4, True), (0.01, False)]:
        pattern = generate_pattern(attn, block_size=B, variant="p", coverage=1.0, max_density=cap, causal=causal)
        cells = 16 * 17 // 2 if causal else 16 * 16
        assert int(pattern.sum()) == max(math.floor(cap * cells), 16)  # the diagonal stays
        assert pattern_density(pattern, causal=causal) <= max(cap, 16 / cells) + 1e-12


def test_ragged_length_and_padded_rows():
    # L = 30 with B = 4: the last block is partial; rows 26.. are padding (all zero in a probe).
    attn = torch.softmax(torch.randn(30, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64), -1)
    attn[26:] = 0.0
    mass = block_mass(attn, 4)
    assert mass.shape == (1, 8, 8) and float(mass.sum()) == pytest.approx(26.0)
    pattern = generate_pattern(attn, block_size=4, variant="p", coverage=0.7)
    kept, _ = mass_kept(attn, pattern, 4)
    assert kept == pytest.approx(_direct_share(attn, pattern, 4), abs=1e-12) and kept >= 0.7


# --------------------------------------------------------------------------------------------
# properties: coverage met with the fewest blocks
# --------------------------------------------------------------------------------------------


@PROPS
@given(
    seed=st.integers(0, 10_000), n=st.integers(8, 48), b=st.sampled_from([2, 4, 8]),
    coverage=st.floats(0.05, 1.0), causal=st.booleans(), heads=st.integers(1, 3),
)
def test_coverage_is_met_by_the_fewest_blocks(seed, n, b, coverage, causal, heads):
    logits = 3.0 * torch.randn(heads, n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if causal:
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    attn = torch.softmax(logits, -1)
    pattern = generate_pattern(attn, block_size=b, variant="p", coverage=coverage, causal=causal, per_head=True)
    _, per_head = mass_kept(attn, pattern, b)
    mass = block_mass(attn, b)
    for h in range(heads):
        assert per_head[h] >= coverage - 1e-9
        assert pattern[h].diagonal().all() and not (causal and pattern[h].triu(1).any())
        # Minimal: dropping the lightest kept off-diagonal block falls short of the coverage.
        off = pattern[h] & ~torch.eye(pattern.shape[-1], dtype=torch.bool)
        if off.any():
            lightest = float(mass[h][off].min())
            assert (float((mass[h] * pattern[h]).sum()) - lightest) / float(mass[h].sum()) < coverage


def test_greedy_matches_brute_force_on_a_tiny_grid():
    torch.manual_seed(3)
    mass = torch.rand(1, 3, 3, dtype=torch.float64)
    for coverage in (0.3, 0.5, 0.7, 0.9, 1.0):
        pattern = coverage_pattern(mass, coverage)
        best = None
        off = [(i, j) for i in range(3) for j in range(3) if i != j]
        for bits in range(1 << len(off)):
            chosen = torch.eye(3, dtype=torch.bool)
            for k, cell in enumerate(off):
                if bits >> k & 1:
                    chosen[cell] = True
            if float((mass[0] * chosen).sum()) >= coverage * float(mass.sum()) - 1e-12:
                best = int(chosen.sum()) if best is None else min(best, int(chosen.sum()))
        assert int(pattern.sum()) == best


def test_oracle_density_is_the_fewest_blocks_for_a_share():
    attn = _map_with_mass_in(FAR, NB, B, causal=False)
    # Reaching what diagonal + FAR hold needs exactly those 12 blocks, no diagonal forced.
    share = _direct_share(attn, generate_pattern(attn, block_size=B, variant="p", coverage=0.88), B)
    assert fewest_blocks_for_mass(attn, share, B) == pytest.approx(12 / 64)
    # With the diagonal forced the oracle is the coverage pattern itself (diagonal-first greedy).
    assert fewest_blocks_for_mass(attn, share, B, diagonal=True) == pytest.approx(12 / 64)
    light = torch.full((NB * B, NB * B), 1.0, dtype=torch.float64)
    light[:B, B:2 * B] = 200.0  # one off-diagonal block with most of the mass
    assert fewest_blocks_for_mass(light, 0.5, B) == pytest.approx(1 / 64)
    assert fewest_blocks_for_mass(light, 0.5, B, diagonal=True) == pytest.approx(9 / 64)


def test_bad_arguments_name_the_field():
    attn = torch.softmax(torch.randn(16, 16), -1)
    with pytest.raises(ValueError, match="coverage"):
        generate_pattern(attn, block_size=4, variant="p", coverage=0.0)
    with pytest.raises(ValueError, match="max_density"):
        generate_pattern(attn, block_size=4, variant="p", max_density=1.5)
    with pytest.raises(ValueError, match="max_density applies only"):
        generate_pattern(attn, block_size=4, variant="cf", max_density=0.5)
    with pytest.raises(ValueError, match="NaN"):
        generate_pattern(torch.full((16, 16), math.nan), block_size=4, variant="p")


# --------------------------------------------------------------------------------------------
# end to end: the switch records mass kept; report() shows it; a checkpoint carries it
# --------------------------------------------------------------------------------------------

POLICY = dict(inner="eager", block_size=8, probe_interval=2, max_dense_steps=4, coverage=0.8)


def _train(preset: str, steps: int = 6, **policy):
    torch.manual_seed(0)
    model, kwargs = zoo.build("gpt2", seq_len=64)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    spion_fx.sparsify(model, preset, optimizer=opt, **{**POLICY, **policy})
    for _ in range(steps):
        logits = model(**kwargs).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), kwargs["input_ids"].flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model, kwargs


@pytest.mark.parametrize("preset, per_head", [("spion-p", False), ("spion-p", True), ("spion-cf", False)])
def test_report_mass_kept_equals_a_direct_float64_sum(preset, per_head):
    model, _ = _train(preset, per_head=per_head)
    rows = {r["site"]: r for r in spion_fx.report(model, print_table=False) if r["kind"] == "attention"}
    sites = list(model.spion_state.attention_sites())
    assert sites and all(s.phase == "sparse" for s in sites)
    for site in sites:
        attn, pattern = site.previous_map, site.pattern  # the map the pattern was built from
        row = rows[site.spec.name]
        assert row["mass_kept"] == pytest.approx(_direct_share(attn, pattern, 8), abs=1e-9)
        if preset == "spion-p":
            assert row["mass_kept"] >= 0.8 - 1e-9
        if per_head:
            assert attn.dim() == 3 and len(row["mass_kept_per_head"]) == attn.shape[0]
            for h, value in enumerate(row["mass_kept_per_head"]):
                assert value == pytest.approx(_direct_share(attn[h], pattern[h], 8), abs=1e-9)
                assert value >= 0.8 - 1e-9
        else:
            assert row["mass_kept_per_head"] is None


def test_mass_kept_survives_a_checkpoint():
    model, kwargs = _train("spion-p", per_head=True)
    fresh, _ = _train("spion-p", steps=0, per_head=True)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        fresh.eval()(**kwargs)  # sites are built (and their checkpoint entries applied) at first sight
    for a, b in zip(model.spion_state.attention_sites(), fresh.spion_state.attention_sites(), strict=True):
        assert float(a.mass_kept) == float(b.mass_kept) and torch.equal(a.mass_kept_per_head, b.mass_kept_per_head)


def test_inspect_patterns_shows_mass_kept(capsys):
    import json

    from spion_fx.inspect import main

    pytest.importorskip("transformers")
    assert main(["--model", "llama", "--policy", "spion-p", "--seq-len", "192", "--patterns", "--format", "json"]) == 0
    sites = [s for s in json.loads(capsys.readouterr().out)["sites"] if s["kind"] == "attention"]
    assert sites and all(s["mass_kept"] >= 0.9 and 0 < s["density"] <= 1 for s in sites)
    assert main(["--model", "llama", "--policy", "dense", "--patterns"]) == 2
