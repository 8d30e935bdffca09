"""`SparsityState`: everything sparsity keeps between steps, as one nn.Module.

It is attached to the user's model (``model.spion_state``) so ``state_dict()`` carries patterns,
phases, probe history, masks and schedule steps, ``.to()`` moves them and DDP sees them. It
counts steps and hands each step's end to the controllers (runtime/attention_controller.py plans
the probes and decides SPION's dense→sparse switch; runtime/linear_controller.py drives the
linear sites), and exposes a variant key (train/eval, grad mode, the linear sites' modes):
whenever that key changes the backend lowers the graph once more (and caches it). Attention sites
run eagerly between the compiled parts, so their phases and probe steps are not part of the key.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from spion_fx.policy import Policy
from spion_fx.runtime.attention_controller import AttentionController
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
        # What the saved tensors mean depends on the policy: a checkpoint of another policy is
        # refused at load (see _check_policy_code), not loaded into sites it does not fit.
        self.register_buffer("policy_code", policy_code(policy))
        self._pending: dict[str, torch.Tensor] = {}  # checkpoint entries of sites not built yet
        self.events: list[dict[str, Any]] = []  # switches, warnings: for report() and the demo
        # Calls of the backend's graphs, and forwards that made none although the model has
        # sites: Dynamo ran them eagerly, i.e. dense (lowering/fallback.py).
        self.graph_calls = 0
        self.eager_forwards = 0
        self.register_load_state_dict_pre_hook(_defer_unknown_sites)
        self.count_steps = "optimizer"  # or "forward": a training forward ends the previous step
        self._forward_seen = False
        self._hooks: list[Any] = []
        self.graph_records: list[Any] = []  # filled by the backend, for report() and inspect
        self.controller = AttentionController(self)  # probes and SPION's switch (its call order)
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
    def variant_key(self, linear_sites: Iterable[nn.Module] | None = None) -> tuple:
        """What compiled code depends on: train/eval, grad mode and the modes of the linear
        sites it calls (`linear_sites`; every linear site when None). Each graph's runner keys on
        its own sites, so a site added by another graph, or a schedule change at one layer,
        re-lowers only the graphs that call it. Attention sites are not part of it: they run
        eagerly between compiled parts, so their phase changes need no re-lowering."""
        if linear_sites is None:
            linear_sites = self.linear.sites.values() if self.linear is not None else ()
        return (self.training, torch.is_grad_enabled(), tuple(site.variant_key() for site in linear_sites))

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
        self.controller.step_end(int(self.step))
        self.step += 1
        self._plan_step()

    def _plan_step(self) -> None:
        """Set each site's probing flag for the step about to run."""
        if self.step.is_meta:
            return  # a meta model's state has no step yet: planned once it is materialized
        self.controller.plan_step(int(self.step), self.training)

    def _switch_to_sparse(self, site: AttentionSiteModule, step: int, *, forced: bool) -> None:
        """Switch one site now (``python -m spion_fx.inspect`` builds patterns from one probe)."""
        self.controller.switch_to_sparse(site, step, forced=forced)

    # ---- devices -------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # A state on the meta device (sparsify on a meta model) holds no values. Leaving meta
        # (`to_empty`, which fills buffers with garbage, or any move) starts it afresh, as a
        # new state on that device would be; a model's own init never reaches these buffers.
        was_meta = self.step.is_meta
        super()._apply(fn, recurse)
        if was_meta and not self.step.is_meta:
            self.step.zero_()
            self.policy_code.copy_(policy_code(self.policy))
            self._plan_step()
        return self

    # ---- train / eval --------------------------------------------------------------------
    def train(self, mode: bool = True) -> SparsityState:
        super().train(mode)
        self._plan_step()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "policy_code"
        if key not in state_dict:
            state_dict[key] = self.policy_code.clone()  # a checkpoint from before policy codes
        else:
            self._check_policy_code(state_dict[key], key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        result = super().load_state_dict(*args, **kwargs)
        self._after_load()
        return result

    def _check_policy_code(self, code: Any, key: str) -> None:
        want = policy_code(self.policy)
        if not isinstance(code, torch.Tensor) or code.shape != want.shape or code.dtype != want.dtype:
            got = f"{type(code).__name__} {tuple(code.shape)} {code.dtype}" if isinstance(code, torch.Tensor) else type(code).__name__
            raise ValueError(f"checkpoint key {key!r} is {got}, expected an int64 tensor of shape {tuple(want.shape)}")
        if torch.equal(code.cpu(), want):
            return
        raise ValueError(
            f"checkpoint key {key!r}: the spion_fx state was saved under {describe_policy_code(code)}, "
            f"but this model is sparsified with {describe_policy_code(want)}; sparsify with the "
            "policy the checkpoint was trained with"
        )

    def _after_load(self) -> None:
        for site in self.attention_sites():
            site.sync_from_buffers()
        self._plan_step()


def policy_code(policy: Policy) -> torch.Tensor:
    """The parts of a policy that decide what the state's tensors mean: the attention method,
    the linear method and its N:M ratio (CRC-32 of the method names, so the code does not depend
    on the order of the lists in policy.py)."""
    from spion_fx.runtime.linear_site import NM_METHODS

    linear = policy.linear
    nm = (linear.n, linear.m) if linear.method in NM_METHODS else (0, 0)
    return torch.tensor(
        [zlib.crc32(policy.attention.method.encode()), zlib.crc32(linear.method.encode()), *nm],
        dtype=torch.long,
    )


def describe_policy_code(code: torch.Tensor) -> str:
    from spion_fx.policy import _ATTENTION_METHODS, _LINEAR_METHODS

    def name(crc: int, names: tuple[str, ...]) -> str:
        return next((n for n in names if zlib.crc32(n.encode()) == crc), f"an unknown method (code {crc})")

    attention, linear, n, m = (int(x) for x in code.tolist())
    ratio = f" {n}:{m}" if n or m else ""
    return f"attention method {name(attention, _ATTENTION_METHODS)!r}, linear method {name(linear, _LINEAR_METHODS)!r}{ratio}"


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

