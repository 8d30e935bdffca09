"""Hugging Face `Trainer` integration: `SpionCallback`.

    model = spion_fx.sparsify(model, "spion-cf", block_size=64)       # no optimizer yet
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SpionCallback()])
    trainer.train()                                   # or train(resume_from_checkpoint=True)

The Trainer builds its optimizer after `sparsify`, so without the callback spion_fx counts
training forwards, and with ``gradient_accumulation_steps=k`` its schedules and probes would run k
times too fast. When training begins, the callback hooks the state's step counter to the optimizer
the Trainer built (under accelerate's wrapper), so ``model.spion_state.step`` follows the
Trainer's ``global_step``.

Every Trainer log gets spion_fx's figures (`spion/...` keys: the step, how many attention sites
are sparse, their mean density and the attention mass their patterns keep, and each switch since
the last log with its site, step, density and mass kept). They are added to the logs the Trainer
passes on, so they land in ``trainer.state.log_history`` and in every callback after this one
(the progress bar's printout). Reporting integrations (`report_to`) run before user callbacks; to
send the figures to them too, put the callback first with `add_spion_callback(trainer)`.

Resuming needs nothing more: the state lives in the model's state_dict, so the checkpoint the
Trainer saves holds patterns, phases, probe history and the step, and `resume_from_checkpoint`
loads them back with the weights.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from accelerate.optimizer import AcceleratedOptimizer
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from spion_fx.runtime.state import SparsityState

logger = logging.getLogger(__name__)
PREFIX = "spion/"


class SpionCallback(TrainerCallback):
    """Counts spion_fx steps by the Trainer's optimizer and logs switches and densities."""

    def __init__(self) -> None:
        self._state: SparsityState | None = None
        self._events_logged = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        spion_state = find_state(model)
        if optimizer is None:
            raise ValueError("SpionCallback: the Trainer passed no optimizer to on_train_begin")
        spion_state.attach_optimizer(_unwrap_optimizer(optimizer))
        if int(spion_state.step) != state.global_step:
            # a checkpoint without spion state, or a model sparsified after some training
            logger.warning(
                "spion_fx: the model's spion step is %d but the Trainer's global step is %d; "
                "spion_fx's schedules continue from %d", int(spion_state.step), state.global_step,
                int(spion_state.step),
            )
        self._state = spion_state
        self._events_logged = len(spion_state.events)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self._state is None or logs is None:
            return
        figures = self.figures()
        logs.update(figures)
        # Trainer.log appended a copy of `logs` to the history just before calling on_log
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)

    def figures(self) -> dict[str, float | int]:
        """The `spion/...` values of one log: totals now, plus the switches since the last log."""
        from spion_fx.reporting import build_report

        assert self._state is not None
        rows = [row for row in build_report(self._state) if row.get("kind") == "attention"]
        sparse = [row for row in rows if row.get("phase") == "sparse"]
        figures: dict[str, float | int] = {
            f"{PREFIX}step": int(self._state.step),
            f"{PREFIX}sparse_sites": len(sparse),
        }
        if rows:
            figures[f"{PREFIX}attention_density"] = sum(float(r.get("density", 1.0)) for r in rows) / len(rows)
        kept = [r["mass_kept"] for r in sparse if _is_number(r.get("mass_kept"))]
        if kept:
            figures[f"{PREFIX}mass_kept"] = sum(kept) / len(kept)
        by_site = {row.get("site"): row for row in rows}
        for event in self._state.events[self._events_logged:]:
            if event.get("event") != "switch":
                continue
            site = event["site"]
            # the report's density (causal-aware, as in spion_fx.report) over the event's raw
            # block fraction, so the per-site and the mean figures agree
            row = by_site.get(site, {})
            density = float(row.get("density", event["density"]))
            figures[f"{PREFIX}switch_step/{site}"] = int(event["step"])
            figures[f"{PREFIX}density/{site}"] = density
            site_kept = row.get("mass_kept", event.get("mass_kept"))
            if _is_number(site_kept):
                figures[f"{PREFIX}mass_kept/{site}"] = float(site_kept)
            logger.info("spion_fx: %s switched to sparse at step %d (density %.3f)", site,
                        int(event["step"]), density)
        self._events_logged = len(self._state.events)
        return figures


def add_spion_callback(trainer: Trainer) -> SpionCallback:
    """Add a `SpionCallback` right after the Trainer's flow callback, ahead of the reporting
    integrations, so `report_to` (TensorBoard, W&B, ...) receives the `spion/...` figures too."""
    callback = SpionCallback()
    callbacks = trainer.callback_handler.callbacks
    callbacks.insert(1 if callbacks else 0, callback)
    return callback


def find_state(model: nn.Module | None) -> SparsityState:
    """The SparsityState of a sparsified model, under any wrapper (DDP, PEFT, ...)."""
    if model is not None:
        for module in model.modules():
            if isinstance(module, SparsityState):
                return module
    raise ValueError(
        "SpionCallback: the Trainer's model is not sparsified; call spion_fx.sparsify(model, policy) "
        "before building the Trainer"
    )


def _unwrap_optimizer(optimizer: Any) -> Any:
    # accelerate's wrapper forwards step() to the torch optimizer it holds (only at gradient
    # accumulation boundaries); step hooks belong on that one, the wrapper has none of its own
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)
