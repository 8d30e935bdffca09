"""`SparsityState`: everything sparsity keeps between steps, as one nn.Module.

It is attached to the user's model (``model.spion_state``) so ``state_dict()`` carries patterns,
phases, probe history, masks and schedule steps, ``.to()`` moves them and DDP sees them. It
counts steps, tells attention sites when to probe, decides SPION's dense→sparse switch, and
exposes a variant key (train/eval, grad mode, the linear sites' modes): whenever that key changes
the backend lowers the graph once more (and caches it). Attention sites run eagerly between the
compiled parts, so their phases and probe steps are not part of the key.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from spion_fx.policy import Policy
from spion_fx.runtime.attention_site import AttentionSiteModule, AttentionSpec


def module_key(name: str) -> str:
    """A ModuleDict key for a qualified site name (dots are not allowed in keys)."""
    return name.replace(".", "__").replace("#", "_")


class SparsityState(nn.Module):
    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self.policy = policy
        self.attention = nn.ModuleDict()
        self.linear: nn.Module | None = None  # LinearSparsityController, created on demand
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        self.version = 0  # bumped on every change that needs re-lowering
        self._pending: dict[str, torch.Tensor] = {}  # checkpoint entries of sites not built yet
        self.events: list[dict[str, Any]] = []  # switches, warnings: for report() and the demo
        self.register_load_state_dict_pre_hook(_defer_unknown_sites)
        self.count_steps = "optimizer"  # or "forward": a training forward ends the previous step
        self._forward_seen = False
        self._hooks: list[Any] = []
        self.graph_records: list[Any] = []  # filled by the backend, for report() and inspect
        self._plan_step()

    def forward(self, *args, **kwargs):
        """Identity: the state holds data, it computes nothing.

        It only exists because the state is a submodule of the user's model, and containers
        such as nn.Sequential call every child in turn; passing the input through keeps them
        working unchanged.
        """
        return args[0] if args else None

    # ---- sites ---------------------------------------------------------------------------
    def attention_site(self, spec: AttentionSpec) -> AttentionSiteModule:
        """The runtime module for an attention site, created on first sight and then reused."""
        key = module_key(spec.name)
        if key not in self.attention:
            site = AttentionSiteModule(spec, self.policy.attention).to(self.step.device)
            if self.policy.attention.enabled and self.step.device.type == "cpu":
                from spion_fx.kernels.attention import native_cpu

                native_cpu.preload()  # the switch must not wait for the kernel's build
            self.attention[key] = site
            self._restore_pending(f"attention.{key}.", site)
            site.train(self.training)
            self._plan_step()
        return self.attention[key]

    def linear_sites(self, sites: list[tuple[str, tuple[int, ...], bool, nn.Parameter]]) -> dict[str, nn.Module]:
        """Runtime modules for linear sites (name, weight shape, transposed, live weight).

        All sites of one graph are added before binding, so MST's Erdős–Rényi allocation sees
        them together; a checkpoint loaded before the first forward is applied right here.
        """
        from spion_fx.runtime.linear_controller import LinearSparsityController, site_key

        if self.linear is None:
            self.linear = LinearSparsityController(self.policy.linear).to(self.step.device)
        controller = self.linear
        fresh = {}
        for name, shape, transposed, weight in sites:
            if site_key(name) not in controller.sites:
                controller.add_site(name, shape, transposed).to(self.step.device)
                fresh[name] = weight
        late = bool(controller.initialized) and fresh and not self._pending_linear()
        self._restore_pending("linear.", controller)
        controller.bind({name: weight for name, _, _, weight in sites})
        if late:
            self._init_late_linear_sites(fresh)
        self.version += 1
        return {name: controller.site(name) for name, *_ in sites}

    def _check_pending(self) -> None:
        """After a whole step every site exists: checkpoint entries still waiting are for sites
        this model does not have (another model, or another policy's site selection)."""
        if not self._pending:
            return
        sites = sorted({".".join(k.split(".")[:2]) for k in self._pending})
        self._pending.clear()
        raise ValueError(
            f"the loaded spion_fx state has sites this model does not have: {', '.join(sites[:5])}"
            f"{' …' if len(sites) > 5 else ''}; load a checkpoint of this model and policy"
        )

    def _pending_linear(self) -> bool:
        return any(k.startswith("linear.") for k in self._pending)

    @torch.no_grad()
    def _init_late_linear_sites(self, weights: dict[str, nn.Parameter]) -> None:
        """Sites first seen after the masks were built (a later graph): N:M from |W| now; MST at
        the global density, since the ER allocation was made without them."""
        from spion_fx.runtime import schedules
        from spion_fx.runtime.mst import random_mask

        for name, weight in weights.items():
            site = self.linear.site(name)
            if site.dense_reason is not None:
                continue
            if site.method == "mst":
                density = 1.0 - schedules.mst_sparsity(int(self.linear.step), self.policy.linear)
                site.layer_density = density
                site.mask.copy_(random_mask(site.weight_shape, density, torch.Generator().manual_seed(0), site.mask.device))
                weight.mul_(site.mask)
                warnings.warn(f"spion_fx: linear site {name!r} appeared after MST's ER allocation; it gets the global density {density:.2f}", stacklevel=3)
            else:
                site.refresh_mask(weight)

    def attention_sites(self) -> Iterator[AttentionSiteModule]:
        return iter(self.attention.values())  # type: ignore[return-value]

    def _restore_pending(self, prefix: str, module: nn.Module) -> None:
        entries = {k[len(prefix):]: v for k, v in self._pending.items() if k.startswith(prefix)}
        if entries:
            module.load_state_dict(entries, strict=False)
            for k in entries:
                del self._pending[prefix + k]

    # ---- variants ------------------------------------------------------------------------
    def variant_key(self) -> tuple:
        """What the compiled code depends on. Attention sites are not part of it: they run
        eagerly between compiled parts, so their phase changes need no re-lowering."""
        linear = self.linear.variant_key() if self.linear is not None else ()
        return (self.training, torch.is_grad_enabled(), linear, self.version)

    # ---- the step loop -------------------------------------------------------------------
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Count steps by `optimizer.step()` (so gradient accumulation is counted right)."""
        self.detach_optimizer()
        self.count_steps = "optimizer"
        self._optimizer = optimizer
        self._hooks = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.before_optimizer_step(opt)),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after_optimizer_step(opt)),
        ]

    def detach_optimizer(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._optimizer = None

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        if self.linear is not None:
            self.linear.before_optimizer_step(int(self.step), optimizer)

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        if self.linear is not None:
            self.linear.after_optimizer_step(int(self.step), optimizer)
        self.on_step_end()

    def on_training_forward(self) -> None:
        """Without an optimizer, a training forward marks the end of the previous step."""
        if self._forward_seen:
            self.before_optimizer_step(None)
            self.after_optimizer_step(None)
        self._forward_seen = True

    def on_step_end(self) -> None:
        """One optimizer step (or training forward) finished: update schedules and phases."""
        self._check_pending()
        step = int(self.step)
        if self.policy.attention.method == "spion":
            self._attention_step_end(step)
        self.step += 1
        self._plan_step()

    def _plan_step(self) -> None:
        """Set each site's probing flag for the step about to run."""
        if self.step.is_meta:
            return  # a meta model's state has no step yet: planned once it is materialized
        att = self.policy.attention
        step = int(self.step)
        probe = att.method == "spion" and self.training and self._is_probe_step(step)
        window = att.hsa_window
        hsa = window is not None and self.training and window[0] <= step < window[1]
        for site in self.attention_sites():
            site.sync_from_buffers()
            # HSA must know the mask is causal(+padding): probe once before the window to see it.
            classify = window is not None and self.training and float(site.probe_stats[0]) == 0 and (
                int(site.stability[0]) == 0 and step < window[1])
            site.probing = (probe or classify) and site.phase == "dense" and site.can_be_sparse[0]
            site.hsa_active = hsa and site.phase == "dense" and site.supports_hsa

    def _is_probe_step(self, step: int) -> bool:
        att = self.policy.attention
        in_window = step % att.probe_interval >= att.probe_interval - att.probe_batches
        forced = att.max_dense_steps is not None and step == att.max_dense_steps - 1
        return in_window or forced

    def _attention_step_end(self, step: int) -> None:
        att = self.policy.attention
        dense = [s for s in self.attention_sites() if s.phase == "dense" and s.can_be_sparse[0]]
        if not dense:
            return
        checks_now = step % att.probe_interval == att.probe_interval - 1
        forced = att.max_dense_steps is not None and step + 1 >= att.max_dense_steps
        if not (checks_now or forced):
            return
        stable = {id(s): self._check_stability(s) for s in dense}
        allowed = step + 1 >= att.min_dense_steps
        if forced:
            to_switch = dense
        elif not allowed:
            to_switch = []
        elif att.switch == "global":
            to_switch = dense if all(stable.values()) else []
        else:
            to_switch = [s for s in dense if stable[id(s)]]
        for site in to_switch:
            self._switch_to_sparse(site, step + 1, forced=forced and not stable[id(site)])

    def _check_stability(self, site: AttentionSiteModule) -> bool:
        """SPION's rule: the Frobenius distance between consecutive maps changes by < tolerance."""
        start = time.perf_counter()
        try:
            return self._check_stability_of(site)
        finally:
            site.check_seconds = site.probe_seconds + time.perf_counter() - start
            site.probe_seconds = 0.0

    def _check_stability_of(self, site: AttentionSiteModule) -> bool:
        count = float(site.probe_stats[0])
        if float(site.probe_stats[1]) > 0:
            warnings.warn(
                f"spion_fx: {int(site.probe_stats[1])} non-finite attention probe(s) skipped at "
                f"site {site.spec.name!r}", stacklevel=3,
            )
            site.probe_stats[1] = 0
        if count == 0:
            return False
        current = _all_reduce_mean(site.probe_accum / count)
        site.probe_accum.zero_()
        site.probe_stats[0] = 0
        site.sync_from_buffers()
        checks, previous_distance, _ = site.stability.tolist()
        stable = False
        if site.previous_map.numel() == current.numel():
            distance = torch.linalg.vector_norm(current - site.previous_map).item()  # Frobenius
            if not math.isnan(previous_distance):
                change = abs(distance - previous_distance) / previous_distance if previous_distance > 0 else (
                    0.0 if distance == 0 else math.inf)
                stable = change < self.policy.attention.tolerance
                site.stability[2] = change
            site.stability[1] = distance
        site.previous_map = current
        site.stability[0] = checks + 1
        return stable

    def _switch_to_sparse(self, site: AttentionSiteModule, step: int, *, forced: bool) -> None:
        from spion_fx.runtime.coverage import mass_kept
        from spion_fx.runtime.pattern import generate_pattern

        start = time.perf_counter()
        att = self.policy.attention
        attention_map = site.previous_map
        if attention_map.numel() == 0:
            site.sync_from_buffers()
            return  # never probed (e.g. not in training): nothing to build a pattern from
        pattern = generate_pattern(
            attention_map, block_size=att.block_size, variant=att.variant, quantile=att.quantile,
            filter_size=att.filter_size, density=att.density, causal=site.causal,
            per_head=attention_map.dim() == 3, coverage=att.coverage, max_density=att.max_density,
        )
        pattern = _broadcast_from_rank0(pattern)
        q_len, kv_len = attention_map.shape[-2:]
        site.set_pattern(pattern.unsqueeze(0) if pattern.dim() == 2 else pattern, q_len, kv_len, step)
        kept, kept_per_head = mass_kept(attention_map, pattern, att.block_size)
        site.record_mass_kept(kept, kept_per_head if attention_map.dim() == 3 else kept_per_head[:0])
        site.switch_seconds = site.check_seconds + time.perf_counter() - start
        density = float(pattern.float().mean())
        self.events.append({
            "event": "switch", "site": site.spec.name, "step": step, "density": density,
            "forced": forced,
        })

    # ---- devices -------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # A state on the meta device (sparsify on a meta model) holds no values. Leaving meta
        # (`to_empty`, which fills buffers with garbage, or any move) starts it afresh, as a
        # new state on that device would be; a model's own init never reaches these buffers.
        was_meta = self.step.is_meta
        super()._apply(fn, recurse)
        if was_meta and not self.step.is_meta:
            self.step.zero_()
            self._plan_step()
        return self

    # ---- train / eval --------------------------------------------------------------------
    def train(self, mode: bool = True) -> SparsityState:
        super().train(mode)
        self._plan_step()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.version += 1

    def load_state_dict(self, *args, **kwargs):
        result = super().load_state_dict(*args, **kwargs)
        self._after_load()
        return result

    def _after_load(self) -> None:
        for site in self.attention_sites():
            site.sync_from_buffers()
        self.version += 1
        self._plan_step()


def _defer_unknown_sites(module: SparsityState, state_dict, prefix, *args) -> None:
    """Keep checkpoint entries of sites that do not exist yet (they appear at first forward)."""
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        local = key[len(prefix):]
        parts = local.split(".")
        if parts[0] == "attention" and len(parts) > 2 and parts[1] not in module.attention:
            module._pending[local] = state_dict.pop(key)
        elif parts[0] == "linear" and module.linear is None:
            module._pending[local] = state_dict.pop(key)


def _all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a probe over ranks so that every rank takes the same decision."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def _broadcast_from_rank0(pattern: torch.Tensor) -> torch.Tensor:
    """Rank 0's pattern wins, so ranks agree bitwise even if float reductions differ."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        buf = pattern.to(torch.uint8).contiguous()
        dist.broadcast(buf, src=0)
        return buf.bool()
    return pattern
