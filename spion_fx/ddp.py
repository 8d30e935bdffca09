"""Keeping spion_fx's state out of DistributedDataParallel's buffer broadcast.

DDP (``broadcast_buffers=True``, its default) re-collects *every* buffer of the wrapped module
before each forward and broadcasts rank 0's values. The SparsityState's buffers are not model
state to copy: probe accumulators are per rank until the controller all-reduces them (a
broadcast would replace rank 1's probes with rank 0's), and their sizes follow each rank's own
batch length (probe frames, block layouts per length) — a rank padded to another length made
gloo abort with "Received data size doesn't match expected size" on the second forward. The
controller already makes every rank agree (runtime/attention_controller.py), so the state's
buffers are added to the active DDP module's ignore set as they appear.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def active_ddp() -> Any:
    """The DistributedDataParallel whose forward is running, if any."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # torch without distributed
        return None
    getter = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    return getter() if getter is not None else None


class DDPBufferGuard:
    """Adds the state's buffer names to the running DDP's ignore set whenever they change."""

    def __init__(self, state: nn.Module) -> None:
        self.state = state
        self._known: tuple[int, ...] = ()

    def after_forward(self) -> None:
        ddp = active_ddp()
        if ddp is None or not hasattr(ddp, "parameters_to_ignore"):
            return
        # The step counter (equal on every rank) stays broadcast: DDP asserts on an empty
        # buffer list when everything it collected at construction is later ignored.
        step = getattr(self.state, "step", None)
        ids = tuple(id(b) for b in self.state.buffers() if b is not step)
        if ids == self._known:
            return
        self._known = ids
        ours = set(ids)
        ddp.parameters_to_ignore.update(
            name for name, buffer in ddp.module.named_buffers() if id(buffer) in ours
        )
