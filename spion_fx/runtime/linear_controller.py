"""`LinearSparsityController`: owns every `LinearSparsitySite` and drives them from the step.

Call order per optimizer step ``t`` (0-based: the number of optimizer steps taken before it):

    loss.backward()
    controller.before_optimizer_step(t, optimizer)   # MST: keep dense grads if an update is due,
                                                     #      then mask grads of inactive weights
    optimizer.step()
    controller.after_optimizer_step(t, optimizer)    # α, N:M masks / stages, MST topology update,
                                                     # masks re-applied, optimizer state zeroed

After ``after_optimizer_step(t)`` every site is in the state of step ``t + 1`` (the next forward).
Everything needed to resume — masks, α, the step, the RNG of random growth — is in buffers, so a
controller restored with ``load_state_dict`` continues identically.

MST deviation from the original: their update step skips the optimizer step; ours cannot (the
training loop is the user's), so the topology update runs right after the optimizer step using
the dense gradient captured just before it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from spion_fx.policy import LinearPolicy
from spion_fx.runtime import schedules
from spion_fx.runtime.linear_site import NM_METHODS, LinearSparsitySite
from spion_fx.runtime.mst import er_densities, random_mask, topology_update, zero_optimizer_state

LayerSpec = tuple[tuple[int, int], bool]  # (stored weight shape, weight_transposed)


def site_key(name: str) -> str:
    return name.replace(".", "_")


class LinearSparsityController(nn.Module):
    def __init__(
        self,
        policy: LinearPolicy,
        layers: Mapping[str, LayerSpec] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.policy = policy
        self.sites = nn.ModuleDict()
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("rng_state", torch.Generator().manual_seed(seed).get_state())
        self._weights: dict[str, Tensor] = {}
        self._dense_grads: dict[str, Tensor] = {}
        self.last_update: dict[str, dict] = {}  # MST counts of the latest topology update
        for name, (shape, transposed) in (layers or {}).items():
            self.add_site(name, shape, transposed)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_sites())

    # -- construction ----------------------------------------------------------------------------
    def add_site(self, name: str, weight_shape: tuple[int, int], weight_transposed: bool = False) -> LinearSparsitySite:
        key = site_key(name)
        if key in self.sites:
            raise ValueError(f"linear site {name!r} is already registered")
        site = LinearSparsitySite(name, weight_shape, weight_transposed, self.policy)
        self.sites[key] = site
        return site

    def site(self, name: str) -> LinearSparsitySite:
        return self.sites[site_key(name)]

    def _mst_sites(self) -> list[LinearSparsitySite]:
        return [s for s in self.sites.values() if s.method == "mst" and s.dense_reason is None]

    def _er(self, step: int) -> dict[str, float]:
        sites = self._mst_sites()
        return er_densities({s.name: s.weight_shape for s in sites}, schedules.mst_sparsity(step, self.policy))

    def _generator(self) -> torch.Generator:
        g = torch.Generator()
        g.set_state(self.rng_state.cpu())
        return g

    def _save_generator(self, g: torch.Generator) -> None:
        self.rng_state.copy_(g.get_state().to(self.rng_state.device))

    # -- life cycle ------------------------------------------------------------------------------
    @torch.no_grad()
    def bind(self, weights: Mapping[str, Tensor]) -> None:
        """Attach the live parameters (site name -> parameter). On first bind, build the initial
        masks (N:M from |W|; MST random at the ER densities of step 0, weights masked)."""
        unknown = [n for n in weights if site_key(n) not in self.sites]
        if unknown:
            raise KeyError(f"bind: no linear site named {unknown}")
        self._weights.update(weights)
        step = int(self.step)
        self._sync_sites()
        if bool(self.initialized):
            return
        densities = self._er(step) if self._mst_sites() else {}
        g = self._generator()
        for site in self.sites.values():
            w = self._weights.get(site.name)
            if w is None or site.dense_reason is not None:
                continue
            if site.method == "mst":
                site.layer_density = densities[site.name]
                site.mask.copy_(random_mask(site.weight_shape, site.layer_density, g, site.mask.device))
                w.mul_(site.mask)
            else:
                site.refresh_mask(w)
        self._save_generator(g)
        self.initialized.fill_(True)

    def _sync_sites(self) -> None:
        step = int(self.step)
        for site in self.sites.values():
            site.sync(step)

    @torch.no_grad()
    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Between backward and ``optimizer.step()``: MST grads of inactive weights are zeroed,
        after keeping a dense copy when a topology update follows this step."""
        update_due = self._mst_update_due(step + 1)
        for site in self._mst_sites():
            w = self._weights.get(site.name)
            if w is None or w.grad is None:
                continue
            if update_due:
                self._dense_grads[site.name] = w.grad.detach().clone()
            w.grad.mul_(site.mask)

    def _mst_update_due(self, next_step: int) -> bool:
        p = self.policy
        return p.method == "mst" and next_step % p.mst_update_interval == 0 and next_step < p.total_steps

    @torch.no_grad()
    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After ``optimizer.step()``: move every site to step ``step + 1``."""
        nxt = step + 1
        self.step.fill_(nxt)
        p = self.policy
        for site in self.sites.values():
            if site.method in NM_METHODS:
                before = (site.active, site.nm)
                site.sync(nxt)
                w = self._weights.get(site.name)
                if w is not None and site.active and (
                    (site.active, site.nm) != before or nxt % p.update_interval == 0
                ):
                    site.refresh_mask(w)
            else:
                site.sync(nxt)
        if self._mst_sites():
            self._mst_after_step(nxt, optimizer)

    def _mst_after_step(self, nxt: int, optimizer: torch.optim.Optimizer | None) -> None:
        update = self._mst_update_due(nxt)
        densities = self._er(nxt) if update else {}
        drop = schedules.mst_drop_fraction(nxt, self.policy)
        g = self._generator() if update else None
        for site in self._mst_sites():
            w = self._weights.get(site.name)
            if w is None:
                continue
            if update:
                site.layer_density = densities[site.name]
                res = topology_update(
                    w, site.mask, self._dense_grads.pop(site.name, None),
                    1.0 - site.layer_density, drop, self.policy.mst_grow_ratio, g,
                )
                site.mask.copy_(res.mask)
                w.masked_fill_(res.grown, 0)
                zero_optimizer_state(optimizer, w, res.pruned | res.grown)
                self.last_update[site.name] = {
                    "n_prune": res.n_prune, "n_grow": res.n_grow,
                    "n_grow_gradient": res.n_grow_gradient, "n_grow_random": res.n_grow_random,
                }
            w.mul_(site.mask)
        if g is not None:
            self._save_generator(g)
        self._dense_grads.clear()

    # -- introspection ---------------------------------------------------------------------------
    def variant_key(self) -> tuple:
        return tuple((k, s.variant_key()) for k, s in self.sites.items())

    def report(self) -> list[dict]:
        return [s.describe() for s in self.sites.values()]

    def training_flops(self, tokens_per_step: int) -> tuple[float, float]:
        """(sparse, dense) analytic FLOPs of the linear layers over the whole schedule
        (steps 0 .. total_steps−1), using each site's ``step_flops`` formula with the density the
        schedule gives at that step (MST: ER density of the latest topology update)."""
        p = self.policy
        sparse = dense = 0.0
        sites = list(self.sites.values())
        if p.method == "mst":
            interval = p.mst_update_interval
            for start in range(0, p.total_steps, interval):
                dens = self._er(start)
                steps = min(interval, p.total_steps - start)
                for s in sites:
                    d = dens.get(s.name, 1.0)
                    sp, de = s.step_flops(tokens_per_step, density=d)
                    upd, _ = s.step_flops(tokens_per_step, density=d, topology_update=True)
                    # the last step of each window is an update step (dense weight gradient)
                    sparse += sp * (steps - 1) + (upd if start + steps < p.total_steps else sp)
                    dense += de * steps
            return sparse, dense
        counts: Counter[tuple[float, bool]] = Counter()
        for t in range(p.total_steps):
            nm = self._nm_at(t)
            alpha = schedules.mdgf_alpha(t, p) if p.method == "mdgf" else 0.0
            counts[(1.0 if nm is None else nm[0] / nm[1], alpha > 0.0)] += 1
        for (d, decaying), count in counts.items():
            for s in sites:
                sp, de = s.step_flops(tokens_per_step, density=d, alpha=1.0 if decaying else 0.0)
                sparse += sp * count
                dense += de * count
        return sparse, dense

    def _nm_at(self, step: int) -> tuple[int, int] | None:
        p = self.policy
        if p.method not in NM_METHODS:
            return None
        if p.method == "sdgf":
            return schedules.sdgf_nm(step, p)
        return None if schedules.pgf_phase(step, p) == "dense" else (p.n, p.m)

