"""`AttentionController`: SPION's dense → sparse decision for every attention site (ALGORITHMS.md §1).

`SparsityState` owns the sites and the step; this controller plans the probes and takes the
decisions. Call order per step ``t`` (0-based, as counted by the state):

    controller.plan_step(t, training)   # before the step's forwards: each site's probing flag
                                        # (and MST's HSA window)
    ... forward(s): dense sites in a probe step add their batch's map into their probe frame
    controller.step_end(t)              # after the optimizer step: at a check step, agree the
                                        # probes over ranks, run the stability rule, switch

After ``step_end(t)`` every site is in the state of step ``t + 1``. Everything the decision reads
is in site buffers (probe frame and counts, probe_stats, stability, previous_map), so a state
restored with ``load_state_dict`` decides as the uninterrupted run would.

Under torch.distributed every rank makes the same collective calls in the same order with the
same sizes at every check step, whatever its own data did (a non-finite probe, batches of
another length, no probe batch at all), and so ends the step with the same decisions:

1. ``_agree_sites``: all-reduce (max) of [site count, CRC of the site names] and their negatives:
   ranks that built different sites raise the same error instead of mismatching collectives.
2. ``_agree_headers``: one all-gather of a fixed-size row per site: probe batches, skipped
   probes, mask code, probe frame (Lq, Lk). Every rank then knows the global batch count, the
   agreed mask code (max: any rank seeing an arbitrary mask keeps the site dense everywhere)
   and the agreed frame (the longest length any rank probed).
3. ``_reduce_map`` per dense site that can be sparse (a list all ranks agree on): the rank's sums
   and per-position counts, brought to the agreed frame (zeros where it has nothing), summed in
   one all-reduce; the map is sums / counts position by position. A rank with no probe batch
   contributes zeros and count 0; a global count of 0 means "not stable" on every rank.
4. ``_broadcast_from_rank0`` per switching site: every rank builds the pattern from the
   bitwise-equal map, and rank 0's copy wins, so patterns are bitwise equal.
"""

from __future__ import annotations

import math
import re
import time
import warnings
import zlib
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from spion_fx.runtime.attention_site import AttentionSiteModule

if TYPE_CHECKING:
    from spion_fx.runtime.state import SparsityState

# Columns of the per-site header row exchanged at a check (step 2 above).
_H_BATCHES, _H_SKIPPED, _H_MASK, _H_LQ, _H_LK = range(5)
_HEADER = 5


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class AttentionController:
    """Plans probes and decides switches for the attention sites of one `SparsityState`."""

    def __init__(self, state: SparsityState) -> None:
        self.state = state

    @property
    def policy(self):
        return self.state.policy.attention

    def sites(self) -> list[AttentionSiteModule]:
        """Every site, in an order that does not depend on when a rank first built it."""
        return sorted(self.state.attention_sites(), key=lambda s: _natural(s.spec.name))

    # ---- before a step -----------------------------------------------------------------------
    def plan_step(self, step: int, training: bool) -> None:
        """Set each site's probing flag (and HSA window) for the step about to run."""
        att = self.policy
        probe = att.method == "spion" and training and self.is_probe_step(step)
        window = att.hsa_window
        hsa = window is not None and training and window[0] <= step < window[1]
        for site in self.state.attention_sites():
            site.sync_from_buffers()
            # HSA must know the mask is causal(+padding): probe once before the window to see it.
            classify = window is not None and training and site.probed_batches == 0 and (
                site.checks_done == 0 and step < window[1])
            site.probing = (probe or classify) and site.phase == "dense" and site.can_be_sparse[0]
            site.hsa_active = hsa and site.phase == "dense" and site.supports_hsa

    def is_probe_step(self, step: int) -> bool:
        att = self.policy
        in_window = step % att.probe_interval >= att.probe_interval - att.probe_batches
        forced = att.max_dense_steps is not None and step == att.max_dense_steps - 1
        return in_window or forced

    # ---- after a step ------------------------------------------------------------------------
    def step_end(self, step: int) -> None:
        """At a check step (the last of a probe window, or the forced one): decide switches."""
        att = self.policy
        if att.method != "spion":
            return
        checks_now = step % att.probe_interval == att.probe_interval - 1
        forced = att.max_dense_steps is not None and step + 1 >= att.max_dense_steps
        if not (checks_now or forced):
            return
        sites = self.sites()
        # Every rank reaches this point at the same step: the decision below, and each
        # collective in it, depends only on data all ranks agree on.
        if not any(s.phase == "dense" for s in sites):
            return  # phases are agreed: every rank returns here together
        self._agree_sites(sites)
        headers = self._agree_headers(sites)
        for site, row in zip(sites, headers):
            if site.mask_code != int(row[_H_MASK]):
                site.mask_code = int(row[_H_MASK])
        dense = [(s, row) for s, row in zip(sites, headers) if s.phase == "dense" and s.can_be_sparse[0]]
        if not dense:
            return
        stable = {id(s): self._check_stability(s, row) for s, row in dense}
        allowed = step + 1 >= att.min_dense_steps
        if forced:
            to_switch = [s for s, _ in dense]
        elif not allowed:
            to_switch = []
        elif att.switch == "global":
            to_switch = [s for s, _ in dense] if all(stable.values()) else []
        else:
            to_switch = [s for s, _ in dense if stable[id(s)]]
        for site in to_switch:
            self.switch_to_sparse(site, step + 1, forced=forced and not stable[id(site)])

    def _check_stability(self, site: AttentionSiteModule, header: torch.Tensor) -> bool:
        start = time.perf_counter()
        try:
            return self._check_stability_of(site, header)
        finally:
            site.check_seconds = site.probe_seconds + time.perf_counter() - start
            site.probe_seconds = 0.0

    def _check_stability_of(self, site: AttentionSiteModule, header: torch.Tensor) -> bool:
        """SPION's rule: the Frobenius distance between consecutive maps changes by < tolerance."""
        if site.skipped_probes > 0:
            warnings.warn(
                f"spion_fx: {site.skipped_probes} non-finite attention probe(s) skipped at "
                f"site {site.spec.name!r}", stacklevel=4,
            )
            site.skipped_probes = 0
        frame = (int(header[_H_LQ]), int(header[_H_LK]))
        current = self._reduce_map(site, frame)  # a collective: every rank, whatever its count
        # A fresh window: `current` may be the old sums divided in place (_reduce_map), and a
        # new zero buffer (calloc'd pages) costs less than writing zeros over the old one.
        site.probe_accum = torch.zeros_like(site.probe_accum)
        site.probe_count.zero_()
        site.probed_batches = 0
        site.sync_from_buffers()
        if current is None:  # no rank had a probe batch (header[_H_BATCHES] == 0)
            return False
        checks, previous_distance = site.checks_done, site.previous_distance
        stable = False
        if site.previous_map.shape == current.shape:
            distance = torch.linalg.vector_norm(current - site.previous_map).item()  # Frobenius
            if not math.isnan(previous_distance):
                change = abs(distance - previous_distance) / previous_distance if previous_distance > 0 else (
                    0.0 if distance == 0 else math.inf)
                stable = change < self.policy.tolerance
                site.last_change = change
            site.previous_distance = distance
        site.previous_map = current
        site.checks_done = checks + 1
        return stable

    def switch_to_sparse(self, site: AttentionSiteModule, step: int, *, forced: bool) -> None:
        """Build the site's pattern from its last agreed probe map and switch it to sparse."""
        from spion_fx.runtime.coverage import mass_kept
        from spion_fx.runtime.pattern import generate_pattern

        start = time.perf_counter()
        att = self.policy
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
        self.state.events.append({
            "event": "switch", "site": site.spec.name, "step": step, "density": density,
            "forced": forced,
        })

    # ---- collectives -------------------------------------------------------------------------
    def _agree_sites(self, sites: list[AttentionSiteModule]) -> None:
        """Fail on every rank alike when ranks built different attention sites."""
        if not distributed():
            return
        names = "\n".join(s.spec.name for s in sites)
        mine = torch.tensor([len(sites), zlib.crc32(names.encode())], dtype=torch.float64)
        both = torch.cat([mine, -mine]).to(_device(sites))
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        if not torch.equal(both[:2].cpu(), -both[2:].cpu()):
            raise RuntimeError(
                "spion_fx: the ranks built different attention sites (this rank: "
                f"{len(sites)}); every rank must run the same model through the same code paths"
            )

    def _agree_headers(self, sites: list[AttentionSiteModule]) -> torch.Tensor:
        """[sites, _HEADER] agreed by every rank: batch and skip counts summed, the mask code and
        the probe frame (the longest length) taken as the maximum over ranks."""
        rows = torch.zeros(len(sites), _HEADER, dtype=torch.float64)
        for row, site in zip(rows, sites):
            row[_H_BATCHES], row[_H_SKIPPED], row[_H_MASK] = site.probed_batches, site.skipped_probes, site.mask_code
            row[_H_LQ], row[_H_LK] = site.probe_frame
        if not distributed():
            return rows
        device = _device(sites)
        gathered = [torch.empty_like(rows, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, rows.to(device))
        stacked = torch.stack(gathered).cpu()
        agreed = stacked.amax(0)
        agreed[:, _H_BATCHES] = stacked[:, :, _H_BATCHES].sum(0)
        agreed[:, _H_SKIPPED] = stacked[:, :, _H_SKIPPED].sum(0)
        return agreed

    def _reduce_map(self, site: AttentionSiteModule, frame: tuple[int, int]) -> torch.Tensor | None:
        """The probe map of the agreed frame, averaged position by position over every probe
        batch of every rank; None when there was none. Same call, same size on every rank."""
        lq, lk = frame
        if lq == 0 or lk == 0:
            return None  # no rank ever sized a frame: nothing to reduce, on every rank alike
        accum, count = self._contribution(site, frame)
        if distributed():
            dtype = torch.promote_types(accum.dtype, torch.float32)
            payload = torch.cat([accum.reshape(-1).to(dtype), count.to(dtype)])
            dist.all_reduce(payload)
            accum = payload[: accum.numel()].view(accum.shape).to(accum.dtype)
            count = payload[accum.numel():].to(count.dtype)
        if not bool((count > 0).any()):
            return None
        if bool((count == count[0]).all()):  # every batch covered the whole frame
            # in place: at L=4096 a copy is 64 MB per site; the caller replaces the buffer
            return accum.div_(count[0].to(accum.dtype))
        # position (i, j) was covered by count[max(i, j)] batches
        rows = torch.arange(lq, device=count.device)[:, None]
        cols = torch.arange(lk, device=count.device)[None, :]
        per_position = torch.where(rows >= cols, count[:lq, None], count[None, :lk]).to(accum.dtype)
        return torch.where(per_position > 0, accum / per_position.clamp_min(1), torch.zeros_like(accum))

    @staticmethod
    def _contribution(site: AttentionSiteModule, frame: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's sums and counts in the agreed frame: its own frame padded with zeros, or
        nothing (zeros, count 0) when its frame cannot be placed inside the agreed one."""
        own = site.probe_frame
        square = own[0] == own[1] and frame[0] == frame[1]
        if own != frame and own != (0, 0) and not square:
            warnings.warn(
                f"spion_fx: site {site.spec.name!r} probed {own[0]}x{own[1]} maps on this rank but "
                f"{frame[0]}x{frame[1]} on another; this rank's probes are left out of the check",
                stacklevel=5,
            )
            site.probe_accum.zero_()
            site.probe_count.zero_()
        if own != frame:
            if not square:
                site.probe_accum = torch.zeros(0, 0, dtype=site.probe_accum.dtype, device=site.probe_accum.device)
                site.probe_count = torch.zeros(0, dtype=site.probe_count.dtype, device=site.probe_count.device)
            site.resize_probe_frame(*frame)
        return site.probe_accum, site.probe_count


def _natural(name: str) -> list:
    """Sort key that puts layer 2 before layer 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _device(sites: list[AttentionSiteModule]) -> torch.device:
    """Where this group's collectives run: the sites' device (gloo on CPU, NCCL on CUDA)."""
    device = sites[0].phase_code.device if sites else torch.device("cpu")
    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    return device


def _broadcast_from_rank0(pattern: torch.Tensor) -> torch.Tensor:
    """Rank 0's pattern wins, so ranks agree bitwise even if float reductions differ."""
    if distributed():
        buf = pattern.to(torch.uint8).contiguous()
        dist.broadcast(buf, src=0)
        return buf.bool()
    return pattern
