"""`finalize(model)`: bake trained sparsity masks into the model for inference.

For every linear site of a `LinearSparsityController`:
- N:M sites (srste / mdgf / sdgf) whose mask is active get the kernel `nm_select` measures fastest
  on the model's device at ``tokens`` rows per call (``mode="speed"``, the default): dense with
  W⊙M baked into the owning module's weight in place (exact; the module stays a plain
  ``nn.Linear`` / ``Conv1D``), or a `PackedNMLinear` (cuSPARSELt / CUTLASS 2:4, Triton, packed
  CPU) replacing it. So finalize never makes a layer slower than dense. ``mode="memory"`` keeps
  the packed N/M storage whatever it costs (the fastest packed kernel). The chosen kernel and its
  measured speed relative to dense go to the site, hence to ``report()``. MDGF is baked with the
  binary mask whatever α was (its fine-tune end state).
- MST sites: W⊙M is written into the weight in place; storage stays dense, because unstructured
  sparsity at these densities has no faster kernel here.
- Sites that never became sparse stay as they are, with the reason.
The owning module is found by the identity of the bound weight parameter (falling back to the
site name as a module path), so names produced by the rewrite pass need not match exactly.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from spion_fx.kernels.nm.packed import PackedNMLinear
from spion_fx.lowering.nm_select import DEFAULT_TOKENS, MODES, Timer, TimingCache, choose_kernel
from spion_fx.runtime.linear_controller import LinearSparsityController
from spion_fx.runtime.linear_site import NM_METHODS, LinearSparsitySite


def _controller(model: nn.Module, controller: LinearSparsityController | None) -> LinearSparsityController:
    if controller is not None:
        return controller
    state = getattr(model, "spion_state", None)
    found = getattr(state, "linear", None)
    if not isinstance(found, LinearSparsityController):
        raise ValueError("finalize: pass controller= or attach one at model.spion_state.linear")
    return found


def _owner(model: nn.Module, site: LinearSparsitySite, weight: torch.Tensor | None) -> tuple[str, nn.Module] | None:
    if weight is not None:
        for path, module in model.named_modules():
            if getattr(module, "weight", None) is weight:
                return path, module
    try:
        return site.name, model.get_submodule(site.name)
    except AttributeError:
        return None


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


@torch.no_grad()
def finalize(
    model: nn.Module, controller: LinearSparsityController | None = None, backend: str = "auto", *,
    mode: str = "speed", tokens: int = DEFAULT_TOKENS, timer: Timer | None = None,
    cache: TimingCache | str | os.PathLike | None = None,
) -> dict[str, str]:
    """Bake masks; returns {site name: what was done (or why not)}.

    ``backend="auto"`` measures (see the module docstring); any other value forces that
    `PackedNMLinear` backend without measuring. ``timer`` / ``cache`` inject timings (tests)."""
    if mode not in MODES:
        raise ValueError(f"finalize: mode={mode!r}, expected one of {MODES}")
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"finalize: tokens={tokens!r}, expected a positive int (rows per call to time)")
    ctl = _controller(model, controller)
    timings = cache if isinstance(cache, TimingCache) else (
        TimingCache(cache) if backend == "auto" and timer is None else None)
    done: dict[str, str] = {}
    for site in ctl.sites.values():
        weight = ctl._weights.get(site.name)
        if site.dense_reason is not None:
            done[site.name] = f"dense: {site.dense_reason}"
            continue
        if not site.active:
            done[site.name] = f"dense: site still in its {site.phase} phase"
            continue
        owner = _owner(model, site, weight)
        if owner is None:
            done[site.name] = "skipped: owning module not found"
            continue
        path, module = owner
        w = module.weight
        if site.method == "mst":
            w.mul_(site.mask.to(w.device))
            done[site.name] = (
                f"mst: mask baked as zeros, dense storage (unstructured, density {site.density():.3f})"
            )
            continue
        if site.method not in NM_METHODS:
            done[site.name] = f"dense: method {site.method}"
            continue
        n, m = site.nm
        mask = site.mask.to(w.device)
        bias = getattr(module, "bias", None)
        if backend != "auto":
            packed = PackedNMLinear.from_dense(
                w, bias, n, m, mask=mask, weight_transposed=site.weight_transposed, backend=backend)
            _replace(model, path, packed)
            site.kernel, site.vs_dense = packed.backend, None
            done[site.name] = f"packed {n}:{m} -> PackedNMLinear[{packed.backend}] ({packed.reason})"
            continue
        mask_oi = mask.t() if site.weight_transposed else mask
        masked = (w.t() if site.weight_transposed else w) * mask_oi
        choice, layer = choose_kernel(
            masked.contiguous(), None if bias is None else bias.detach(), n, m, mask_oi,
            mode=mode, tokens=tokens, timer=timer, cache=timings)
        site.kernel, site.vs_dense = choice.kernel, choice.vs_dense
        ratio = "" if choice.vs_dense is None else f"{choice.vs_dense:.2f}x dense speed; "
        if layer is None:
            w.mul_(mask)
            done[site.name] = f"dense {n}:{m}: masked weight baked in place ({ratio}{choice.summary()})"
        else:
            _replace(model, path, layer)
            done[site.name] = f"packed {n}:{m} -> PackedNMLinear[{choice.kernel}] ({ratio}{choice.summary()})"
    return done
