"""What to sparsify and how: `Policy`, its parts, and named presets.

A Policy is plain data. It is validated when built (a wrong value raises ValueError naming the
field and what it accepts) and never touches graphs. Presets are parsed from strings such as
``"spion-cf"``, ``"nm-2:4"`` or ``"spion-cf+nm-2:4"``; keyword overrides go to whichever part owns
the field: ``Policy.preset("spion-cf", probe_interval=50, block_size=32)``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Literal

AttentionMethod = Literal["dense", "spion"]
LinearMethod = Literal["dense", "srste", "mdgf", "sdgf", "mst"]
InnerCompiler = Literal["inductor", "eager", "aot_eager"]

_ATTENTION_METHODS = ("dense", "spion")
_VARIANTS = ("cf", "c", "f", "p")
_SWITCH = ("global", "per-layer")
_LINEAR_METHODS = ("dense", "srste", "mdgf", "sdgf", "mst")
_DECAYS = ("linear", "exp")
_SDGF = ("stepwise", "geometric", "densify")
_HSA = ("strided", "local+strided")
_INNER = ("inductor", "eager", "aot_eager")


def _fail(owner: str, name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{owner}.{name}={value!r} is invalid: expected {allowed}")


def _check_choice(owner: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(owner, name, value, "one of " + ", ".join(repr(c) for c in choices))


def _check_int(owner: str, name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
        high is not None and value > high
    ):
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        _fail(owner, name, value, bound)


def _check_float(owner: str, name: str, value: Any, low: float, high: float, *, open_low=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        lo = "(" if open_low else "["
        _fail(owner, name, value, f"a number in {lo}{low}, {high}]")


def _check_globs(owner: str, name: str, value: Any) -> None:
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        _fail(owner, name, value, "a tuple of glob strings, e.g. ('*.attn',)")


@dataclass
class AttentionPolicy:
    """How attention sites are treated (SPION, ALGORITHMS.md §1)."""

    method: AttentionMethod = "dense"
    variant: Literal["cf", "c", "f", "p"] = "cf"
    block_size: int = 64
    quantile: float = 0.98
    filter_size: int = 31
    density: float | None = None  # block budget for variant "c"
    coverage: float = 0.9  # variant "p": share of the probe map's attention mass to keep
    max_density: float | None = None  # variant "p": cap on the share of blocks kept
    per_head: bool = False
    probe_interval: int = 200
    probe_batches: int = 1  # batches averaged into A_s at each check (original: 1)
    tolerance: float = 0.15
    switch: Literal["global", "per-layer"] = "global"
    min_dense_steps: int = 0
    max_dense_steps: int | None = None  # guaranteed switch; None = only when stable
    compat: Literal["spion"] | None = None  # "spion": pruned logits count as 0 (original quirk)
    # MST's Hybrid Sparse Attention: a step window with a strided (or local ∪ strided) causal mask.
    hsa_window: tuple[int, int] | None = None
    hsa_mode: Literal["strided", "local+strided"] = "strided"
    hsa_stride: int = 128
    hsa_local: int = 128
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        own = "attention"
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)
        _check_choice(own, "method", self.method, _ATTENTION_METHODS)
        _check_choice(own, "variant", self.variant, _VARIANTS)
        _check_int(own, "block_size", self.block_size, 1, 4096)
        _check_float(own, "quantile", self.quantile, 0.0, 1.0)
        _check_int(own, "filter_size", self.filter_size, 1)
        if self.filter_size % 2 == 0:
            _fail(own, "filter_size", self.filter_size, "an odd integer (the filter is centred)")
        if self.density is not None:
            _check_float(own, "density", self.density, 0.0, 1.0, open_low=True)
        if self.method == "spion" and self.variant == "c" and self.density is None:
            _fail(own, "density", None, "a number in (0, 1] when variant='c' (its block budget)")
        _check_float(own, "coverage", self.coverage, 0.0, 1.0, open_low=True)
        if self.max_density is not None:
            _check_float(own, "max_density", self.max_density, 0.0, 1.0, open_low=True)
            if self.variant != "p":
                _fail(own, "max_density", self.max_density, "None unless variant='p' (it caps the coverage pattern)")
        if not isinstance(self.per_head, bool):
            _fail(own, "per_head", self.per_head, "True or False")
        _check_int(own, "probe_interval", self.probe_interval, 1)
        _check_int(own, "probe_batches", self.probe_batches, 1, self.probe_interval)
        _check_float(own, "tolerance", self.tolerance, 0.0, 1e9, open_low=True)
        _check_choice(own, "switch", self.switch, _SWITCH)
        _check_int(own, "min_dense_steps", self.min_dense_steps, 0)
        if self.max_dense_steps is not None:
            _check_int(own, "max_dense_steps", self.max_dense_steps, self.min_dense_steps)
        _check_choice(own, "compat", self.compat, (None, "spion"))
        if self.hsa_window is not None:
            w = self.hsa_window
            if not (isinstance(w, (tuple, list)) and len(w) == 2 and all(isinstance(x, int) for x in w) and 0 <= w[0] < w[1]):
                _fail(own, "hsa_window", w, "(start_step, end_step) with 0 <= start < end")
            self.hsa_window = (int(w[0]), int(w[1]))
        _check_choice(own, "hsa_mode", self.hsa_mode, _HSA)
        _check_int(own, "hsa_stride", self.hsa_stride, 1)
        _check_int(own, "hsa_local", self.hsa_local, 1)
        _check_globs(own, "include", self.include)
        _check_globs(own, "exclude", self.exclude)

    @property
    def enabled(self) -> bool:
        return self.method != "dense" or self.hsa_window is not None

    def selects(self, name: str) -> bool:
        return _selected(name, self.include, self.exclude)


@dataclass
class LinearPolicy:
    """How linear sites are treated (N:M with SR-STE / PGF decay, or MST; ALGORITHMS.md §2–3)."""

    method: LinearMethod = "dense"
    n: int = 2
    m: int = 4
    update_interval: int = 1  # steps between recomputing N:M masks from |W|
    srste_lambda: float = 2e-4
    # Progressive gradient flow: dense phase -> decay / stages -> binary fine-tune phase.
    total_steps: int = 10_000
    dense_steps: int = 0
    finetune_steps: int = 0
    decay: Literal["linear", "exp"] = "exp"
    decay_beta: float = 1e-4
    sdgf_schedule: Literal["stepwise", "geometric", "densify"] = "stepwise"
    # Mixed Sparsity Training.
    mst_sparsity: float = 0.9  # target sparsity in the ultra-sparse phase
    mst_final_sparsity: float = 0.75  # after restoration
    mst_warmup_frac: float = 0.1
    mst_ultra_frac: float = 0.7  # warm-up + ultra phases end at this fraction of training
    mst_update_interval: int = 100
    mst_drop_fraction: float = 0.3
    mst_grow_ratio: int = 3  # r: r/(r+1) grown by gradient, the rest at random
    include_embeddings: bool = False
    include_lm_head: bool = False
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        own = "linear"
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)
        _check_choice(own, "method", self.method, _LINEAR_METHODS)
        _check_int(own, "m", self.m, 2, 1024)
        _check_int(own, "n", self.n, 1, self.m - 1)
        _check_int(own, "update_interval", self.update_interval, 1)
        _check_float(own, "srste_lambda", self.srste_lambda, 0.0, 1.0)
        _check_int(own, "total_steps", self.total_steps, 1)
        _check_int(own, "dense_steps", self.dense_steps, 0, self.total_steps)
        _check_int(own, "finetune_steps", self.finetune_steps, 0, self.total_steps - self.dense_steps)
        _check_choice(own, "decay", self.decay, _DECAYS)
        _check_float(own, "decay_beta", self.decay_beta, 0.0, 1e6)
        _check_choice(own, "sdgf_schedule", self.sdgf_schedule, _SDGF)
        if self.method == "sdgf" and self.sdgf_schedule == "geometric" and self.m % self.n:
            _fail(own, "m", self.m, f"a multiple of n={self.n} for the geometric SDGF schedule")
        _check_float(own, "mst_sparsity", self.mst_sparsity, 0.0, 1.0)
        _check_float(own, "mst_final_sparsity", self.mst_final_sparsity, 0.0, 1.0)
        _check_float(own, "mst_warmup_frac", self.mst_warmup_frac, 0.0, 1.0)
        _check_float(own, "mst_ultra_frac", self.mst_ultra_frac, self.mst_warmup_frac, 1.0)
        _check_int(own, "mst_update_interval", self.mst_update_interval, 1)
        _check_float(own, "mst_drop_fraction", self.mst_drop_fraction, 0.0, 1.0)
        _check_int(own, "mst_grow_ratio", self.mst_grow_ratio, 0)
        _check_globs(own, "include", self.include)
        _check_globs(own, "exclude", self.exclude)

    @property
    def enabled(self) -> bool:
        return self.method != "dense"

    def selects(self, name: str, role: str = "linear") -> bool:
        if role == "embedding" and not self.include_embeddings:
            return False
        if role == "lm_head" and not self.include_lm_head:
            return False
        return _selected(name, self.include, self.exclude)


@dataclass
class Policy:
    """The whole sparsification plan: an attention part, a linear part, and how to compile."""

    attention: AttentionPolicy = field(default_factory=AttentionPolicy)
    linear: LinearPolicy = field(default_factory=LinearPolicy)
    inner_compiler: InnerCompiler = "inductor"
    name: str = "custom"

    def __post_init__(self) -> None:
        if isinstance(self.attention, dict):
            self.attention = AttentionPolicy(**self.attention)
        if isinstance(self.linear, dict):
            self.linear = LinearPolicy(**self.linear)
        _check_choice("policy", "inner_compiler", self.inner_compiler, _INNER)

    @classmethod
    def preset(cls, spec: str, **overrides: Any) -> Policy:
        """Build a named preset, optionally overriding fields of either part by name."""
        return _apply_overrides(_parse_preset(spec), overrides)

    @classmethod
    def coerce(cls, policy: Policy | str | dict | None, **overrides: Any) -> Policy:
        """Accept a Policy, a preset string, a dict of fields, or None (= "dense")."""
        if policy is None:
            policy = "dense"
        if isinstance(policy, str):
            return cls.preset(policy, **overrides)
        if isinstance(policy, dict):
            policy = cls(**policy)
        if not isinstance(policy, Policy):
            raise TypeError(
                f"policy must be a spion_fx.Policy, a preset name or a dict, got {type(policy).__name__}"
            )
        return _apply_overrides(policy, overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        parts = []
        if self.attention.method == "spion":
            a = self.attention
            rule = f"coverage {a.coverage}" if a.variant == "p" else f"q={a.quantile}"
            cap = f", max density {a.max_density}" if a.max_density is not None else ""
            parts.append(f"SPION-{a.variant.upper()} (block {a.block_size}, {rule}{cap}, probe every {a.probe_interval})")
        if self.attention.hsa_window is not None:
            parts.append(f"HSA {self.attention.hsa_mode} steps {self.attention.hsa_window}")
        if self.linear.method != "dense":
            lin = self.linear
            parts.append("MST" if lin.method == "mst" else f"{lin.method.upper()} {lin.n}:{lin.m}")
        return ", ".join(parts) or "dense"


def _selected(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in include) and not any(
        fnmatch.fnmatchcase(name, p) for p in exclude
    )


def _apply_overrides(policy: Policy, overrides: dict[str, Any]) -> Policy:
    if not overrides:
        return policy
    top, att, lin = {}, {}, {}
    att_fields = {f.name for f in dataclasses.fields(AttentionPolicy)}
    lin_fields = {f.name for f in dataclasses.fields(LinearPolicy)}
    for key, value in overrides.items():
        if key in ("inner_compiler", "name"):
            top[key] = value
        elif key.startswith("attention_") and key[10:] in att_fields:
            att[key[10:]] = value
        elif key.startswith("linear_") and key[7:] in lin_fields:
            lin[key[7:]] = value
        elif key in att_fields and key in lin_fields:
            raise ValueError(
                f"policy override {key!r} is ambiguous: write attention_{key}= or linear_{key}="
            )
        elif key in att_fields:
            att[key] = value
        elif key in lin_fields:
            lin[key] = value
        else:
            known = sorted(att_fields | lin_fields | {"inner_compiler"})
            raise ValueError(f"unknown policy field {key!r}; known fields: {', '.join(known)}")
    return dataclasses.replace(
        policy,
        attention=dataclasses.replace(policy.attention, **att),
        linear=dataclasses.replace(policy.linear, **lin),
        **top,
    )


_NM = re.compile(r"^(nm|pgf-mdgf|pgf-sdgf)-(\d+):(\d+)$")

PRESETS: dict[str, str] = {
    "dense": "no sparsity; sites are rewritten to runtime modules that compute exactly the original",
    "spion-cf": "SPION, convolution + flood fill block pattern (the paper's best variant)",
    "spion-c": "SPION, convolution + top-k blocks (density 0.05 by default)",
    "spion-f": "SPION, flood fill on the pooled map without convolution",
    "spion-p": "coverage-targeted blocks: per layer (or head) the fewest blocks keeping 90 % of the probed attention mass",
    "nm-N:M": "N:M weight masks with SR-STE (e.g. nm-2:4, nm-1:16)",
    "pgf-mdgf-N:M": "progressive gradient flow, mask decay (MDGF) to N:M",
    "pgf-sdgf-N:M": "progressive gradient flow, structure decay (SDGF stepwise) to N:M",
    "mst": "Mixed Sparsity Training: unstructured, ER densities, sparsity variation, Mixed-Growing",
    "mst-hsa": "MST plus Hybrid Sparse Attention (strided causal mask) in the middle of training",
}


def _parse_preset(spec: str) -> Policy:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"policy preset must be a non-empty string, got {spec!r}")
    attention, linear = AttentionPolicy(), LinearPolicy()
    for part in spec.strip().lower().split("+"):
        if part == "dense":
            continue
        if part in ("spion-cf", "spion-c", "spion-f", "spion-p", "spion"):
            variant = part.split("-")[1] if "-" in part else "cf"
            density = 0.05 if variant == "c" else None
            attention = AttentionPolicy(method="spion", variant=variant, density=density)
        elif part in ("mst", "mst-hsa"):
            linear = LinearPolicy(method="mst")
            if part == "mst-hsa":
                attention = dataclasses.replace(attention, hsa_window=(1000, 9000))
        elif match := _NM.match(part):
            kind, n, m = match.group(1), int(match.group(2)), int(match.group(3))
            method = {"nm": "srste", "pgf-mdgf": "mdgf", "pgf-sdgf": "sdgf"}[kind]
            linear = LinearPolicy(method=method, n=n, m=m)
        else:
            raise ValueError(
                f"unknown policy preset {part!r} in {spec!r}; presets: {', '.join(PRESETS)} "
                "(combine with '+', e.g. 'spion-cf+nm-2:4')"
            )
    return Policy(attention=attention, linear=linear, name=spec)
