import pytest

from spion_fx.policy import AttentionPolicy, LinearPolicy, Policy


def test_presets_parse():
    p = Policy.preset("spion-cf")
    assert p.attention.method == "spion" and p.attention.variant == "cf"
    assert p.linear.method == "dense"
    p = Policy.preset("spion-c")
    assert p.attention.variant == "c" and p.attention.density == 0.05
    p = Policy.preset("spion-f+nm-2:4")
    assert p.attention.variant == "f" and (p.linear.method, p.linear.n, p.linear.m) == ("srste", 2, 4)
    p = Policy.preset("pgf-mdgf-1:16")
    assert (p.linear.method, p.linear.n, p.linear.m) == ("mdgf", 1, 16)
    assert Policy.preset("pgf-sdgf-1:16").linear.method == "sdgf"
    assert Policy.preset("mst").linear.method == "mst"
    assert Policy.preset("dense").attention.method == "dense"
    p = Policy.preset("spion-p")
    assert p.attention.variant == "p" and (p.attention.coverage, p.attention.max_density) == (0.9, None)
    p = Policy.preset("spion-p", coverage=0.95, max_density=0.3, per_head=True)
    assert (p.attention.coverage, p.attention.max_density, p.attention.per_head) == (0.95, 0.3, True)
    assert "coverage 0.95, max density 0.3" in p.describe()


def test_overrides_route_to_their_part():
    p = Policy.preset("spion-cf", probe_interval=7, block_size=32, srste_lambda=1e-3)
    assert p.attention.probe_interval == 7 and p.attention.block_size == 32
    assert p.linear.srste_lambda == 1e-3
    p = Policy.preset("nm-2:4", linear_include=("*.mlp.*",))
    assert p.linear.include == ("*.mlp.*",)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"block_size": 0}, "attention.block_size"),
        ({"quantile": 1.5}, "attention.quantile"),
        ({"filter_size": 30}, "attention.filter_size"),
        ({"switch": "sometimes"}, "attention.switch"),
        ({"probe_batches": 500}, "attention.probe_batches"),
        ({"tolerance": 0}, "attention.tolerance"),
        ({"compat": "other"}, "attention.compat"),
        ({"coverage": 0}, "attention.coverage"),
        ({"coverage": 1.2}, "attention.coverage"),
        ({"max_density": 0}, "attention.max_density"),
        ({"max_density": "0.5"}, "attention.max_density"),
    ],
)
def test_invalid_attention_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        Policy.preset("spion-p" if "max_density" in kwargs else "spion-cf", **kwargs)


def test_max_density_only_caps_the_coverage_variant():
    with pytest.raises(ValueError, match=r"attention\.max_density.*variant='p'"):
        Policy.preset("spion-cf", max_density=0.2)
    assert Policy.preset("spion-p", max_density=0.2).attention.max_density == 0.2


def test_invalid_linear_values_name_the_field():
    with pytest.raises(ValueError, match=r"linear\.n"):
        LinearPolicy(method="srste", n=4, m=4)
    with pytest.raises(ValueError, match=r"linear\.m"):
        LinearPolicy(method="srste", n=1, m=1)
    with pytest.raises(ValueError, match=r"linear\.method"):
        LinearPolicy(method="magic")


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown policy preset"):
        Policy.preset("spion-x")
    with pytest.raises(ValueError, match="unknown policy field"):
        Policy.preset("spion-cf", nonsense=1)
    with pytest.raises(ValueError, match="ambiguous"):
        Policy.preset("spion-cf", method="dense")
    with pytest.raises(TypeError):
        Policy.coerce(42)


def test_variant_c_needs_density():
    with pytest.raises(ValueError, match=r"attention\.density"):
        AttentionPolicy(method="spion", variant="c")


def test_filters():
    att = AttentionPolicy(include=("model.layers.*",), exclude=("*.3.*",))
    assert att.selects("model.layers.0.self_attn")
    assert not att.selects("model.layers.3.self_attn")
    assert not att.selects("encoder.layer.0.attention")
    lin = LinearPolicy(method="srste")
    assert lin.selects("h.0.mlp.c_fc")
    assert not lin.selects("lm_head", role="lm_head")
    assert LinearPolicy(method="srste", include_lm_head=True).selects("lm_head", role="lm_head")


def test_policy_round_trips_through_dict():
    p = Policy.preset("spion-cf+nm-2:4", probe_interval=3)
    q = Policy(**p.to_dict())
    assert q == p
