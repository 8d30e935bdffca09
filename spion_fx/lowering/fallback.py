"""Telling the user when Dynamo runs a sparsified model without spion_fx's graphs.

Dynamo may run a frame eagerly instead of through our backend: past its recompile limit, after a
graph break it cannot resume from (inside a context manager), or when a frame is skipped. The
model then computes densely and correctly, so nothing else would ever notice: `report()` would
still say "sparse". Every graph our backend returns counts its calls on the state
(`SparsityState.graph_calls`); a forward of a model that has sites and made no such call ran
without them, and the user is told once, with the reason, and `report()` shows it.
"""

from __future__ import annotations

import warnings
from types import CodeType
from typing import Any

import torch


def has_sites(state: Any) -> bool:
    return any(record.rewritten for record in getattr(state, "graph_records", ()))


def recompile_limit() -> int:
    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8)))


def compiled_entries(code: CodeType) -> int:
    """How many compiled entries Dynamo holds for `code` (0 where the API is missing)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(code))
    except Exception:  # noqa: BLE001 - a private API: without it the reason is just less precise
        return 0


def fallback_reason(code: CodeType) -> str:
    entries = compiled_entries(code)
    if entries >= recompile_limit():
        return (f"Dynamo's recompile limit ({recompile_limit()}) was reached for this model's "
                f"forward ({entries} compiled entries); raise torch._dynamo.config.recompile_limit")
    return ("Dynamo ran the forward without compiling it (a graph break it could not resume from, "
            "a skipped frame, or a recompile limit of a frame shared with other models)")


def check_forward(state: Any, calls_before: int, code: CodeType, model_name: str) -> None:
    """After a forward: warn once (and record it for report()) if no graph of ours ran."""
    if state.graph_calls != calls_before or not has_sites(state):
        return
    state.eager_forwards += 1
    if state.eager_forwards > 1:
        return
    reason = fallback_reason(code)
    state.events.append({"event": "eager_fallback", "step": int(state.step), "reason": reason})
    warnings.warn(
        f"spion_fx: {model_name} ran without spion_fx's compiled graphs: every site computed "
        f"dense in this forward (and report() counts such forwards). Reason: {reason}",
        stacklevel=4,
    )
