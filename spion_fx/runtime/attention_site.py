"""The runtime module that replaces one attention computation in a rewritten graph.

Dense phase: computes exactly what the original subgraph computed (SDPA call or eager
matmul→softmax→matmul chain) and, in probe steps, feeds SPION's stability probe. Sparse phase:
calls the block-sparse attention op with the layer's pattern. The module runs eagerly between
the compiled parts of the graph (lowering/partition.py): it reads its phase and probing flag at
every call, so a phase change takes effect on the next forward and re-compiles nothing.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spion_fx.kernels.attention import probe as probe_op
from spion_fx.kernels.attention.layout import BlockLayout
from spion_fx.policy import AttentionPolicy

PHASE_DENSE, PHASE_SPARSE = 0, 1
KERNELS = ("dense", "probe", "hsa", "sparse")  # what report() counts per site
# What each entry of the site's statistics buffers holds; read them through the named properties
# of AttentionSiteModule (probed_batches, skipped_probes, mask_code, checks_done, …).
PROBED_BATCHES, SKIPPED_PROBES, MASK_CODE = 0, 1, 2  # probe_stats (the probe op's layout)
CHECKS_DONE, PREVIOUS_DISTANCE, LAST_CHANGE = 0, 1, 2  # stability
_MASK_KINDS = {
    "none": probe_op.MASK_KIND_NONE,
    "bool_keep": probe_op.MASK_KIND_BOOL_KEEP,
    "bool_fill": probe_op.MASK_KIND_BOOL_FILL,
    "additive": probe_op.MASK_KIND_ADDITIVE,
}


@dataclass(frozen=True)
class AttentionSpec:
    """Facts about one attention site, as plain data (the runtime knows nothing of FX)."""

    name: str
    form: str = "sdpa"  # "sdpa" | "eager"
    mask_kind: str = "none"
    mask_fill_value: float | None = None
    is_causal: bool = False
    scale: float | None = None  # multiplicative; None: 1/sqrt(D) or a runtime `scale` argument
    dropout_p: float = 0.0
    dropout_train_only: bool = True
    enable_gqa: bool = False
    softmax_dtype: torch.dtype | None = None  # eager chains often softmax in float32
    cross_attention: bool = False
    q_len: int | None = None
    kv_len: int | None = None
    num_heads: int | None = None


class _StatisticView:
    """A named entry of a site's statistics buffer: reads convert to a Python number, writes go
    into the buffer in place (so state_dict() and report() see them)."""

    def __init__(self, buffer: str, index: int, cast: type, doc: str) -> None:
        self.buffer, self.index, self.cast, self.__doc__ = buffer, index, cast, doc

    def __get__(self, site: Any, owner: type | None = None) -> Any:
        if site is None:
            return self
        return self.cast(getattr(site, self.buffer)[self.index])

    def __set__(self, site: Any, value: float) -> None:
        getattr(site, self.buffer)[self.index] = value


class AttentionSiteModule(nn.Module):
    """One attention site: dense compute + probes, then block-sparse compute."""

    def __init__(self, spec: AttentionSpec, policy: AttentionPolicy) -> None:
        super().__init__()
        self.spec = spec
        self.policy = policy
        self.probing = False  # set by SparsityState for probe steps
        self.hsa_active = False  # MST's Hybrid Sparse Attention window
        self.register_buffer("phase_code", torch.tensor(PHASE_DENSE, dtype=torch.long))
        self.register_buffer("switch_step", torch.tensor(-1, dtype=torch.long))
        self.register_buffer("pattern", torch.zeros(0, 0, 0, dtype=torch.bool))
        self.register_buffer("pattern_len", torch.zeros(2, dtype=torch.long))  # (Lq, Lk) it was made for
        # The probe frame: sums of probe maps at the reference length (the longest seen); a batch
        # of length l adds into its top-left [:l, :l]. probe_count[t] batches covered the
        # positions (i, j) with max(i, j) == t, so batches of different lengths average
        # position by position (runtime/attention_controller.py).
        self.register_buffer("probe_accum", torch.zeros(0, 0))
        self.register_buffer("probe_count", torch.zeros(0, dtype=torch.float64))
        # [PROBED_BATCHES, SKIPPED_PROBES (non-finite), MASK_CODE (mask structure, max seen)]
        self.register_buffer("probe_stats", torch.zeros(3, dtype=torch.float64))
        self.register_buffer("previous_map", torch.zeros(0, 0))
        # [CHECKS_DONE, PREVIOUS_DISTANCE, LAST_CHANGE (relative)]
        self.register_buffer("stability", torch.tensor([0.0, math.nan, math.nan], dtype=torch.float64))
        # Share of the probe map's attention mass the pattern keeps (runtime/coverage.py), set at
        # the switch from the map the pattern was built from: overall, and per head when the map
        # is per head ([0] otherwise). Persistent, so report() after a resume still has them.
        self.register_buffer("mass_kept", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("mass_kept_per_head", torch.zeros(0, dtype=torch.float64))
        # Python mirrors of the buffers above that forward() branches on: reading a buffer's
        # value at every call would cost a device sync on CUDA.
        self._phase = PHASE_DENSE
        self._mask_code = probe_op.MASK_PADDING
        self._built_layouts: set[tuple[int, int]] = set()  # (nQB, nKB) held in layout buffers
        # Host seconds spent because of the switch (report()'s "switch s"): the probes of the
        # deciding check, the stability check, the pattern and the first layout build.
        self.probe_seconds = 0.0
        self.check_seconds = 0.0
        self.switch_seconds: float | None = None
        self._warned: set[str] = set()
        self._decode_layouts: dict[tuple[int, int, int], Any] = {}  # kernels/attention/decode.py
        # Calls per kernel since the last phase change (report()): proof that the sparse kernel ran.
        self.kernel_calls: dict[str, int] = dict.fromkeys(KERNELS, 0)

    # ---- state -----------------------------------------------------------------------------
    @property
    def phase(self) -> str:
        return "sparse" if self._phase == PHASE_SPARSE else "dense"

    @property
    def causal(self) -> bool:
        """Causal by flag, or by the mask the probes saw (HF often passes causal as a mask)."""
        return self.spec.is_causal or self._mask_code == probe_op.MASK_CAUSAL

    def sync_from_buffers(self) -> None:
        """Refresh the Python mirrors after buffers changed outside forward (load, probes)."""
        self._phase = int(self.phase_code)
        self._mask_code = int(self.probe_stats[MASK_CODE])

    # ---- statistics (named views of probe_stats and stability) ------------------------------
    probed_batches = _StatisticView("probe_stats", PROBED_BATCHES, float,
                                    "Probe batches accumulated since the last stability check (this rank).")
    skipped_probes = _StatisticView("probe_stats", SKIPPED_PROBES, int,
                                    "Probes skipped as non-finite since the last stability check (this rank).")
    checks_done = _StatisticView("stability", CHECKS_DONE, int, "Stability checks done.")
    previous_distance = _StatisticView("stability", PREVIOUS_DISTANCE, float,
                                       "Frobenius distance between the last two probe maps (NaN before the second check).")
    last_change = _StatisticView("stability", LAST_CHANGE, float,
                                 "Relative change of that distance at the last check (NaN before the third).")

    @property
    def mask_code(self) -> int:
        """The mask structure the probes saw (probe.MASK_PADDING / MASK_CAUSAL / MASK_ARBITRARY)."""
        return int(self.probe_stats[MASK_CODE])

    @mask_code.setter
    def mask_code(self, value: int) -> None:
        self.probe_stats[MASK_CODE] = value
        self._mask_code = int(value)

    @property
    def probe_frame(self) -> tuple[int, int]:
        """(Lq, Lk) of the probe frame; (0, 0) before it is sized."""
        if self.probe_accum.numel() == 0:
            return (0, 0)
        return tuple(self.probe_accum.shape[-2:])  # type: ignore[return-value]

    @property
    def can_be_sparse(self) -> tuple[bool, str]:
        """Whether this site can run block-sparse, and if not, why (for report())."""
        if self.spec.cross_attention:
            return False, "cross-attention (query and key sequences differ)"
        if self.mask_code == probe_op.MASK_ARBITRARY:
            return False, "mask is not causal/padding (arbitrary bias or per-head mask)"
        return True, ""

    @property
    def supports_hsa(self) -> bool:
        """HSA needs causal self-attention whose mask is known to be causal (+ padding)."""
        if self.spec.cross_attention:
            return False
        return (self.spec.is_causal and self.spec.mask_kind == "none") or self._mask_code == probe_op.MASK_CAUSAL

    def ensure_probe_shape(self, q_len: int, kv_len: int) -> None:
        """Size the probe frame for a length the probes will watch (the backend calls this for
        every shape it lowers): the first length, grown when a longer one comes."""
        self.fit_probe_frame(q_len, kv_len)

    def fit_probe_frame(self, q_len: int, kv_len: int) -> bool:
        """Make the probe frame able to take a batch of q_len × kv_len; False when it cannot.

        Self-attention batches (Lq == Lk) of any length fit a square frame, which grows to the
        longest length seen (sums and counts kept, zeros padded). A non-square frame (queries
        and keys of different lengths) takes only batches of exactly its shape.
        """
        frame = self.probe_frame
        if frame == (q_len, kv_len):
            return True
        if frame == (0, 0):
            self.resize_probe_frame(q_len, kv_len)
            return True
        if q_len == kv_len and frame[0] == frame[1]:
            if q_len > frame[0]:
                self.resize_probe_frame(q_len, kv_len)
            return True
        return False

    def resize_probe_frame(self, q_len: int, kv_len: int) -> None:
        """A probe frame of q_len × kv_len holding what the old one held in its top-left corner
        (the old frame must fit inside; anything else starts an empty frame)."""
        heads = self.spec.num_heads if self.policy.per_head and self.spec.num_heads else None
        shape = (heads, q_len, kv_len) if heads else (q_len, kv_len)
        device = self.phase_code.device
        accum = torch.zeros(shape, dtype=self.probe_accum.dtype, device=device)
        count = torch.zeros(max(q_len, kv_len), dtype=self.probe_count.dtype, device=device)
        old_q, old_k = self.probe_frame
        fits = old_q <= q_len and old_k <= kv_len and self.probe_accum.dim() == accum.dim()
        if self.probe_accum.numel() and fits and self.probe_count.numel() <= count.numel():
            accum[..., :old_q, :old_k] = self.probe_accum
            count[: self.probe_count.numel()] = self.probe_count
        self.probe_accum, self.probe_count = accum, count

    def set_pattern(self, pattern: torch.Tensor, q_len: int, kv_len: int, step: int) -> None:
        self.pattern = pattern.to(device=self.phase_code.device, dtype=torch.bool)
        self.pattern_len = torch.tensor([q_len, kv_len], dtype=torch.long, device=self.phase_code.device)
        self.phase_code.fill_(PHASE_SPARSE)
        self.switch_step.fill_(step)
        self._forget_layouts()
        self.sync_from_buffers()

    def record_mass_kept(self, overall: float, per_head: torch.Tensor) -> None:
        """Store what the pattern keeps of its probe map (see runtime/coverage.py)."""
        self.mass_kept.fill_(overall)
        self.mass_kept_per_head = per_head.detach().to(device=self.phase_code.device, dtype=torch.float64)

    def _forget_layouts(self) -> None:
        """The pattern changed (switch, load): layouts built from the old one are stale, and the
        kernel counts start again for the new phase."""
        self._built_layouts.clear()
        self._decode_layouts = {}
        self.kernel_calls = dict.fromkeys(KERNELS, 0)

    def set_dense(self) -> None:
        self.phase_code.fill_(PHASE_DENSE)
        self._forget_layouts()
        self.sync_from_buffers()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Pattern and probe buffers change shape during training; adopt the checkpoint's shapes
        # once they are known to make sense for this site and policy.
        if prefix + "pattern" in state_dict and prefix + "mass_kept" not in state_dict:
            # A checkpoint from before mass kept was recorded: load it, the mass is unknown.
            state_dict[prefix + "mass_kept"] = torch.tensor(math.nan, dtype=torch.float64)
            state_dict[prefix + "mass_kept_per_head"] = torch.zeros(0, dtype=torch.float64)
        accum, stats = state_dict.get(prefix + "probe_accum"), state_dict.get(prefix + "probe_stats")
        if accum is not None and stats is not None and prefix + "probe_count" not in state_dict:
            # A checkpoint from before per-position probe counts: every batch had the frame's length.
            length = max(accum.shape[-2:]) if accum.numel() and accum.dim() >= 2 else 0
            batches = float(stats[PROBED_BATCHES]) if stats.numel() == 3 else 0.0
            state_dict[prefix + "probe_count"] = torch.full((length,), batches, dtype=torch.float64)
        self._check_checkpoint_tensors(state_dict, prefix)
        self._check_checkpoint_pattern(state_dict, prefix)
        for name in ("pattern", "probe_accum", "probe_count", "previous_map", "mass_kept_per_head"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=self.phase_code.device))
        self._forget_layouts()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.sync_from_buffers()

    _GROWING = ("pattern", "probe_accum", "probe_count", "previous_map", "mass_kept_per_head")

    def _check_checkpoint_tensors(self, state_dict, prefix: str) -> None:
        """Refuse a site entry that is truncated, of the wrong shape or dtype, or made under
        another policy, naming the key and what was expected (never load it half-way)."""
        names = [name for name, _ in self.named_buffers(recurse=False)
                 if name not in self._non_persistent_buffers_set]
        present = [n for n in names if prefix + n in state_dict]
        if not present:
            return
        site = f"attention site {self.spec.name!r}"
        missing = [prefix + n for n in names if prefix + n not in state_dict]
        if missing:
            raise ValueError(f"{site}: the checkpoint lacks {', '.join(missing)} (truncated or from another version)")

        def fail(name: str, got: str, want: str) -> None:
            raise ValueError(f"{site}: checkpoint key {prefix + name!r} is {got}, expected {want}")

        def kind(t: torch.Tensor) -> str:
            return "bool" if t.dtype == torch.bool else "floating" if t.is_floating_point() else (
                "complex" if t.is_complex() else "integer")

        for name in names:
            value, own = state_dict[prefix + name], getattr(self, name)
            if not isinstance(value, torch.Tensor):
                fail(name, type(value).__name__, f"a tensor of {own.dtype}")
            if kind(value) != kind(own):
                fail(name, f"of dtype {value.dtype}", f"a {kind(own)} tensor like {own.dtype}")
            if name not in self._GROWING and value.shape != own.shape:
                fail(name, f"of shape {tuple(value.shape)}", f"shape {tuple(own.shape)}")
        get = lambda name: state_dict[prefix + name]  # noqa: E731
        heads = self.spec.num_heads if self.policy.per_head and self.spec.num_heads else None
        per_head = "per_head=True" if self.policy.per_head else "per_head=False"
        pattern = get("pattern")
        if pattern.dim() != 3:
            fail("pattern", f"{pattern.dim()}-D", "3-D [heads, query blocks, key blocks]")
        if pattern.numel():
            if heads and pattern.shape[0] == 1 and heads > 1:
                fail("pattern", "one pattern shared by all heads", f"{heads} per-head patterns ({per_head})")
            if not heads and pattern.shape[0] != 1:
                fail("pattern", f"{pattern.shape[0]} per-head patterns", f"one shared pattern ({per_head})")
        for name in ("probe_accum", "previous_map"):
            value = get(name)
            if value.numel() == 0:
                continue
            want = 3 if heads else 2
            if value.dim() != want or (heads and value.shape[0] != heads):
                fail(name, f"of shape {tuple(value.shape)}",
                     f"[{heads}, Lq, Lk] ({per_head})" if heads else f"[Lq, Lk] ({per_head})")
        accum, count = get("probe_accum"), get("probe_count")
        if count.dim() != 1 or count.numel() != (max(accum.shape[-2:]) if accum.numel() else count.numel()):
            fail("probe_count", f"of shape {tuple(count.shape)}",
                 f"[{max(accum.shape[-2:]) if accum.numel() else 'L'}] (one count per position of the probe frame)")
        if get("mass_kept_per_head").dim() != 1:
            fail("mass_kept_per_head", f"of shape {tuple(get('mass_kept_per_head').shape)}", "1-D")
        phase = int(get("phase_code"))
        if phase not in (PHASE_DENSE, PHASE_SPARSE):
            fail("phase_code", f"{phase}", f"{PHASE_DENSE} (dense) or {PHASE_SPARSE} (sparse)")
        if phase == PHASE_SPARSE:
            lengths = get("pattern_len")
            if pattern.numel() == 0 or int(lengths.min()) <= 0 or int(get("switch_step")) < 0:
                fail("pattern", "empty (or its length / switch step unset) for a sparse site",
                     "the block pattern the site switched to (the checkpoint is truncated)")

    def _check_checkpoint_pattern(self, state_dict, prefix: str) -> None:
        pattern, lengths = state_dict.get(prefix + "pattern"), state_dict.get(prefix + "pattern_len")
        if pattern is None or lengths is None or pattern.numel() == 0:
            return
        bs = self.policy.block_size
        want = (-(-int(lengths[0]) // bs), -(-int(lengths[1]) // bs))
        if tuple(pattern.shape[-2:]) != want:
            raise ValueError(
                f"attention site {self.spec.name!r}: the checkpoint's pattern is "
                f"{tuple(pattern.shape[-2:])} blocks for length {int(lengths[0])}, but this policy's "
                f"block_size={bs} needs {want}; sparsify with the policy the checkpoint was trained with"
            )
        heads = pattern.shape[0]
        if heads > 1 and self.spec.num_heads and heads != self.spec.num_heads:
            raise ValueError(
                f"attention site {self.spec.name!r}: the checkpoint has {heads} per-head patterns but "
                f"this layer has {self.spec.num_heads} heads"
            )

    # ---- compute ---------------------------------------------------------------------------
    def forward(self, q, k, v, mask=None, scale=None, *, spec: AttentionSpec | None = None):
        """Attention as the calling graph computes it, in this site's current phase.

        `spec` is the calling graph's view of the site (a model may reach one attention module
        through several graphs: training, prefill and decode steps differ in mask and causal
        flag); the phase, pattern and probes are the site's own.
        """
        spec = self.spec if spec is None else spec
        scale = spec.scale if scale is None else scale
        if torch._C._current_graph_task_id() != -1:
            # inside the autograd engine: a checkpointed block recomputed in backward
            # (lowering/checkpoint_regions.py), whose forward already probed and counted
            counts = dict(self.kernel_calls)
            try:
                return self._compute(q, k, v, mask, scale, spec)
            finally:
                self.kernel_calls.update(counts)
        if self.probing:
            self._probe(q, k, mask, scale, spec)
        return self._compute(q, k, v, mask, scale, spec)

    def _compute(self, q, k, v, mask, scale, spec):
        if self.phase == "sparse" and q.dim() == 4:
            return self._sparse(q, k, v, mask, scale, spec)
        if self.hsa_active and q.dim() == 4 and q.shape[-2] == k.shape[-2]:
            self.kernel_calls["hsa"] += 1
            return self._hybrid_sparse(q, k, v, mask, scale, spec)
        self.kernel_calls["dense"] += 1
        if spec.form == "sdpa":
            return self._dense_sdpa(q, k, v, mask, scale, spec)
        return self._dense_eager(q, k, v, mask, scale, spec)

    def _dropout_p(self, spec: AttentionSpec) -> float:
        if spec.dropout_train_only and not self.training:
            return 0.0
        return spec.dropout_p

    def _dense_sdpa(self, q, k, v, mask, scale, spec):
        kwargs = {"enable_gqa": True} if spec.enable_gqa else {}
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self._dropout_p(spec),
            is_causal=spec.is_causal, scale=scale, **kwargs,
        )

    def _dense_eager(self, q, k, v, mask, scale, spec):
        if q.dim() == 4 and k.shape[1] != q.shape[1]:
            # detection hands us k/v before HF's repeat_kv (GQA); repeat_kv == repeat_interleave
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2))
        if scale is not None:
            scores = scores * scale
        scores = _apply_mask(scores, mask, spec.mask_kind, spec.mask_fill_value)
        if spec.is_causal:
            lq, lk = scores.shape[-2:]
            causal = torch.ones(lq, lk, dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if spec.softmax_dtype is not None:
            probs = torch.softmax(scores, dim=-1, dtype=spec.softmax_dtype).to(q.dtype)
        else:
            probs = torch.softmax(scores, dim=-1)
        p = self._dropout_p(spec)
        if p > 0:
            probs = F.dropout(probs, p=p, training=True)
        return torch.matmul(probs, v)

    def _probe(self, q, k, mask, scale, spec):
        lq, lk = q.shape[-2], k.shape[-2]
        if not self.fit_probe_frame(lq, lk):
            return  # queries and keys of another non-square shape (a key-value cache)
        s = float(scale) if isinstance(scale, (int, float)) else 1.0 / math.sqrt(q.shape[-1])
        causal = spec.is_causal
        start = time.perf_counter()
        before = self.probed_batches
        torch.ops.spion.attention_probe(
            self.probe_accum, self.probe_stats, q.detach(), k.detach(),
            None if mask is None else mask.detach(), _MASK_KINDS[spec.mask_kind], s, causal,
        )
        self.kernel_calls["probe"] += 1
        if self.probed_batches > before:  # skipped (non-finite) batches cover nothing
            self.probe_count[: max(lq, lk)] += 1
        self.probe_seconds += time.perf_counter() - start

    def _hybrid_sparse(self, q, k, v, mask, scale, spec):
        from spion_fx.kernels.attention.hsa import hybrid_sparse_attention

        key_padding = None
        if mask is not None and spec.mask_kind != "none":
            key_padding = _key_padding(mask, spec.mask_kind, q.shape[0])
        local = self.policy.hsa_local if self.policy.hsa_mode == "local+strided" else 0
        q, k, v = _common_dtype(q, k, v)
        return hybrid_sparse_attention(
            q, k, v, stride=self.policy.hsa_stride, local=local, scale=scale,
            key_padding_mask=key_padding, dropout_p=self._dropout_p(spec),
        )

    def _sparse(self, q, k, v, mask, scale, spec):
        from spion_fx.kernels import block_sparse_attention

        q, k, v = _common_dtype(q, k, v)
        lq, lk = q.shape[-2], k.shape[-2]
        causal = self.causal or spec.is_causal
        key_padding = None
        if mask is not None and spec.mask_kind != "none":
            key_padding = _key_padding(mask, spec.mask_kind, q.shape[0])
        if lq < lk:
            k, v, key_padding = _crop_unwritten_cache(k, v, key_padding)
            return self._sparse_decode(q, k, v, key_padding, scale, spec, causal)
        self.kernel_calls["sparse"] += 1
        return block_sparse_attention(
            q, k, v, self._layout(lq, lk), scale=scale, causal=causal, key_padding_mask=key_padding,
            dropout_p=self._dropout_p(spec), compat=self.policy.compat,
        )

    def _sparse_decode(self, q, k, v, key_padding, scale, spec, causal):
        """Queries at the end of a key-value cache (generation): each new token attends to the
        key blocks its block row of the pattern keeps, exactly as the rows of a full forward
        over the same tokens would (kernels/attention/decode.py)."""
        from spion_fx.kernels.attention.decode import block_sparse_decode_attention

        if self._dropout_p(spec) > 0 or self.policy.compat is not None:
            # no dropout / SPION-compat softmax in the decode kernel: training with a cache
            self.kernel_calls["dense"] += 1
            self._warn_once("decode_dense", "queries fewer than keys with dropout or compat='spion' "
                            "in training: this call runs dense")
            return self._dense_sdpa(q, k, v, None if key_padding is None else key_padding[:, None, None, :],
                                    scale, dataclasses.replace(spec, is_causal=False))
        self.kernel_calls["sparse"] += 1
        layout = self._decode_layout(q.shape[-2], k.shape[-2], k.shape[1])
        return block_sparse_decode_attention(q, k, v, layout, scale=scale, causal=causal, key_padding_mask=key_padding)

    def _decode_layout(self, lq: int, lk: int, kv_heads: int):
        """The decode layout for ceil(Lk / block) key blocks, built once and reused until the
        cache grows into a new block (a host read of the pattern per new block)."""
        from spion_fx.kernels.attention.decode import DecodeLayout
        from spion_fx.runtime.pattern import resize_pattern

        bs = self.policy.block_size
        nk, rows = -(-lk // bs), -(-lq // bs) + 1  # a query chunk may straddle one more block row
        key = (nk, rows, kv_heads)
        layout = self._decode_layouts.get(key)
        if layout is None or layout.device != self.pattern.device:
            pattern = self.pattern
            if pattern.shape[-1] < nk:
                self._warn_resize(nk, pattern.shape[-2])
                pattern = torch.stack([resize_pattern(p, nk) for p in pattern])
            # one cached layout per cache length in blocks: drop the ones the cache grew out of
            self._decode_layouts = {k_: v_ for k_, v_ in self._decode_layouts.items() if k_[0] >= nk}
            layout = DecodeLayout.from_pattern(pattern, bs, lk, min(rows * bs, lk), num_kv_heads=kv_heads)
            self._decode_layouts[key] = layout
        return layout

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"spion_fx: attention site {self.spec.name!r}: {message}", stacklevel=3)

    _LAYOUT_FIELDS = ("kv_num_blocks", "kv_indices", "q_num_blocks", "q_indices")

    def _layout(self, lq: int, lk: int) -> BlockLayout:
        """The block layout for these lengths, held in non-persistent buffers.

        Buffers (not plain attributes) so that ``model.to(...)`` moves them with the site; built
        at the first call for a length (the site runs eagerly, lowering/partition.py).
        """
        bs = self.policy.block_size
        nq, nk = -(-lq // bs), -(-lk // bs)
        key = (nq, nk)
        if key not in self._built_layouts:
            start = time.perf_counter()
            pattern = self.pattern
            if pattern.shape[-2:] != (nq, nk):
                pattern = self._resized(pattern, nq, nk)
            layout = BlockLayout.from_dense(pattern.to(self.phase_code.device), bs)
            for field_name in self._LAYOUT_FIELDS:
                self.register_buffer(f"layout_{nq}x{nk}_{field_name}", getattr(layout, field_name), persistent=False)
            self._built_layouts.add(key)
            if self.switch_seconds is not None:
                self.switch_seconds += time.perf_counter() - start
        names = [f"layout_{nq}x{nk}_{f}" for f in self._LAYOUT_FIELDS]
        return BlockLayout(*(getattr(self, n) for n in names), bs)

    def _resized(self, pattern: torch.Tensor, nq: int, nk: int) -> torch.Tensor:
        from spion_fx.runtime.pattern import resize_pattern

        if nq != nk:
            raise ValueError(f"site {self.spec.name!r}: block-sparse attention needs Lq == Lk blocks")
        self._warn_resize(nq, pattern.shape[-2])
        return torch.stack([resize_pattern(p, nq) for p in pattern])

    def _warn_resize(self, blocks: int, made_for: int) -> None:
        if blocks > made_for:
            self._warn_once("resize", f"sees {blocks} blocks per row but its pattern was made for "
                            f"{made_for}; extending it with the diagonal band")


class AttentionCall(nn.Module):
    """One graph's call of an attention site: the graph's own spec, the site's shared state.

    A model reaches one attention module through several graphs (training at full length,
    prefill, decode steps with a key-value cache): they differ in mask and causal flag, and each
    must compute what its own graph computed, while the phase, pattern and probes belong to the
    layer. The rewritten graph calls this module; the site lives in the SparsityState.
    """

    def __init__(self, site: AttentionSiteModule, spec: AttentionSpec) -> None:
        super().__init__()
        self.site = site
        self.spec = spec

    def forward(self, q, k, v, mask=None, scale=None):
        return self.site(q, k, v, mask, scale, spec=self.spec)


def _crop_unwritten_cache(k, v, key_padding):
    """Keys up to the last one any query may see: a static cache (HF's StaticCache) hands over
    all of its slots, the unwritten ones masked; the newest query sits at the last visible key,
    not at the end of the slots, and the decode kernel places queries at the end of the keys.
    Reading the mask costs a host sync on CUDA, only when a mask is given."""
    if key_padding is None:
        return k, v, key_padding
    visible = key_padding.any(0).nonzero()
    last = int(visible.max()) + 1 if visible.numel() else k.shape[-2]
    if last == k.shape[-2]:
        return k, v, key_padding
    return k[..., :last, :], v[..., :last, :], key_padding[:, :last]


def _common_dtype(q, k, v):
    """q, k, v in one dtype, as SDPA would see them: the autocast dtype under autocast (SDPA is
    on autocast's lower-precision list), else their promoted type. HF Llama's rotary embedding
    hands over float32 q/k next to a bf16 v under autocast; the block-sparse ops want one dtype."""
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _apply_mask(scores, mask, kind: str, fill_value: float | None):
    if mask is None or kind == "none":
        return scores
    if kind == "additive":
        return scores + mask
    if kind == "bool_fill":
        value = float("-inf") if fill_value is None else fill_value
        return scores.masked_fill(mask, value)
    return scores.masked_fill(~mask, float("-inf"))  # bool_keep


def _key_padding(mask: torch.Tensor, kind: str, batch: int) -> torch.Tensor:
    """Key-padding vector [B, Lk] from a padding(+causal) mask: its last query row.

    The last query sees every real key whether the mask is causal or not; the probe already
    checked that the mask has this structure (otherwise the site stays dense).
    """
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return probe_op.visible_keys(mask[:, 0, -1, :], _MASK_KINDS[kind]).expand(batch, -1)
