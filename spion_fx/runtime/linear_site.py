"""`LinearSparsitySite`: the runtime module the rewrite pass calls in place of one linear op.

``site(x, W, b)`` computes exactly ``F.linear(x, W, b)`` (W [out, in]) or, for weights stored
transposed (GPT-2 Conv1D), ``addmm(b, x, W)`` (W [in, out]) — with W replaced by the effective
weight of the current mode. Python branches in ``forward`` depend only on ``variant_key()``;
everything that changes per step (mask, α) is a buffer updated in place by the controller.

Per method (ALGORITHMS.md §2–3):
- ``srste``: W⊙M forward, g + λ(1−M)⊙W backward.
- ``mdgf``: W⊙(M + (1−M)α) forward, plain STE backward; α = 0 in fine-tune gives the binary mask
  without changing the graph.
- ``sdgf``: W⊙M of the current stage's N:M with plain STE backward — the authors' ``StepDecay``
  (their SDGF does not add the SR-STE term).
- ``mst``: W⊙M forward with STE backward, so the dense gradient is there at topology updates; the
  controller masks gradients of inactive weights before each optimizer step.
Layers whose input size is not a multiple of every M used by the schedule stay dense, and
``describe()`` gives the reason.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spion_fx.policy import LinearPolicy
from spion_fx.runtime import schedules
from spion_fx.runtime.nm import mdgf_weight, nm_mask, srste_weight, ste_masked_weight

NM_METHODS = ("srste", "mdgf", "sdgf")


class LinearSparsitySite(nn.Module):
    def __init__(
        self,
        name: str,
        weight_shape: tuple[int, int],
        weight_transposed: bool = False,
        policy: LinearPolicy | None = None,
        layer_density: float | None = None,
    ) -> None:
        super().__init__()
        if len(weight_shape) != 2:
            raise ValueError(f"{name}: weight_shape must be 2-D, got {tuple(weight_shape)}")
        self.name = name
        self.policy = policy if policy is not None else LinearPolicy()
        self.weight_shape = (int(weight_shape[0]), int(weight_shape[1]))
        self.weight_transposed = bool(weight_transposed)
        self.in_features, self.out_features = (
            self.weight_shape[::-1] if not self.weight_transposed else self.weight_shape
        )
        self.layer_density = layer_density  # MST: ER density at the current target
        self.register_buffer("mask", torch.ones(self.weight_shape, dtype=torch.bool))
        self.register_buffer("alpha", torch.ones((), dtype=torch.float32))
        self.dense_reason: str | None = self._dense_reason()
        # Python state mirrored from the step by sync(); only `active` affects forward.
        self.active = False
        self.phase = "dense"
        self.nm: tuple[int, int] | None = None
        self.stage: int | None = None
        # Set by finalize(): the kernel measured fastest for this layer and its speed vs dense.
        self.kernel: str | None = None
        self.vs_dense: float | None = None
        self.sync(0)

    # -- configuration ---------------------------------------------------------------------------
    @property
    def method(self) -> str:
        return self.policy.method

    def stage_list(self) -> list[tuple[int, int]]:
        p = self.policy
        if p.method == "sdgf":
            return schedules.sdgf_stages(p.n, p.m, p.sdgf_schedule)
        return [(p.n, p.m)]

    def _dense_reason(self) -> str | None:
        if self.method == "dense":
            return "policy method is dense"
        if self.method in NM_METHODS:
            need = math.lcm(*(m for _, m in self.stage_list()))
            if self.in_features % need:
                return f"input size {self.in_features} is not a multiple of M={need}"
        return None

    # -- state -----------------------------------------------------------------------------------
    def sync(self, step: int) -> None:
        """Set the Python-side mode for ``step`` and the α buffer (masks are the controller's)."""
        p = self.policy
        if self.dense_reason is not None:
            self.active, self.phase, self.nm, self.stage = False, "dense", None, None
            return
        if p.method == "mst":
            self.active, self.phase, self.nm, self.stage = True, "sparse", None, None
            return
        self.phase = schedules.pgf_phase(step, p)
        self.active = self.phase != "dense"
        if p.method == "sdgf":
            self.stage = schedules.sdgf_stage_index(step, p)
            self.nm = schedules.sdgf_nm(step, p)
        else:
            self.stage, self.nm = None, (p.n, p.m)
        if p.method == "mdgf":
            self.alpha.fill_(schedules.mdgf_alpha(step, p))

    @torch.no_grad()
    def refresh_mask(self, weight: Tensor) -> None:
        """Recompute the N:M mask of the current stage from |W| (no-op when inactive)."""
        if self.active and self.method in NM_METHODS and self.nm is not None:
            n, m = self.nm
            self.mask.copy_(nm_mask(weight, n, m, transposed=self.weight_transposed))

    def variant_key(self) -> tuple:
        return (self.method, self.active)

    # -- compute ---------------------------------------------------------------------------------
    def effective_weight(self, weight: Tensor) -> Tensor:
        if not self.active:
            return weight
        method = self.method
        if method == "srste":
            return srste_weight(weight, self.mask, self.policy.srste_lambda)
        if method == "mdgf":
            return mdgf_weight(weight, self.mask, self.alpha)
        return ste_masked_weight(weight, self.mask)  # sdgf, mst

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        w = self.effective_weight(weight)
        if not self.weight_transposed:
            return F.linear(x, w, bias)
        if bias is not None and x.dim() == 2:
            return torch.addmm(bias, x, w)
        y = torch.matmul(x, w)
        return y + bias if bias is not None else y

    # -- reporting -------------------------------------------------------------------------------
    def density(self) -> float:
        if not self.active:
            return 1.0
        if self.method == "mst":
            return float(self.mask.float().mean())
        n, m = self.nm
        return n / m

    def pattern(self) -> str:
        if not self.active:
            return "dense"
        if self.method == "mst":
            return "unstructured"
        return f"{self.nm[0]}:{self.nm[1]}"

    def describe(self) -> dict:
        return {
            "name": self.name,
            "method": self.method,
            "phase": self.phase,
            "pattern": self.pattern(),
            "density": self.density(),
            "stage": self.stage,
            "stages": [f"{n}:{m}" for n, m in self.stage_list()] if self.method == "sdgf" else None,
            "alpha": float(self.alpha) if self.method == "mdgf" else None,
            "weight_shape": self.weight_shape,
            "weight_transposed": self.weight_transposed,
            "dense_reason": self.dense_reason,
            "kernel": self.kernel,
            "vs_dense": self.vs_dense,
        }

    @property
    def numel(self) -> int:
        return self.weight_shape[0] * self.weight_shape[1]

    def step_flops(self, tokens: int, *, density: float | None = None, alpha: float = 0.0,
                   topology_update: bool = False) -> tuple[float, float]:
        """(sparse, dense) analytic FLOPs of one training step through this layer.

        Dense: 6·P·T (forward 2PT, input gradient 2PT, weight gradient 2PT).
        Sparse, with d the kept fraction: forward 2dPT and input gradient 2dPT — but dense while
        MDGF's α > 0, since the pruned weights still take part; weight gradient 2PT for the N:M
        methods (their straight-through estimators need the dense gradient every step) and 2dPT for
        MST except on topology-update steps, which need the dense gradient (2PT; RigL/MST
        accounting). ``density`` defaults to the current state."""
        p, t = float(self.numel), float(tokens)
        dense = 6.0 * p * t
        d = self.density() if density is None else density
        if self.dense_reason is not None or d >= 1.0:
            return dense, dense
        d_fwd = 1.0 if (self.method == "mdgf" and alpha > 0.0) else d
        if self.method == "mst":
            d_wgrad = 1.0 if topology_update else d
        else:
            d_wgrad = 1.0
        return 2.0 * p * t * (2.0 * d_fwd + d_wgrad), dense
