"""Which kernel computes a finalized N:M layer: the fastest one, measured on the layer's device.

Candidates are whatever the device offers: dense ``F.linear`` with W⊙M (exact, always there); on
CUDA, cuSPARSELt and CUTLASS 2:4 (`kernels.nm.semi_structured`) and the packed Triton kernels; on
CPU, the packed CPU path. A sparse format is not faster by itself — on an H200 at 8192 tokens,
PyTorch's 2:4 path runs at 0.30× dense and the packed Triton kernel at 0.05× — so nothing is
assumed: every candidate is first checked against the dense masked output (a kernel that computes
something else is never chosen), then timed at a representative token count (median of a few
calls after warm-up; CUDA events on GPU).

Times are cached on disk, one JSON file under ``$SPION_FX_CACHE_DIR`` (else
``$XDG_CACHE_HOME/spion_fx`` or ``~/.cache/spion_fx``; a per-user temporary directory where that
cannot be written), keyed by device name, torch version, shape, dtype, N:M, token count and
kernel, so a model is measured once per machine and shape. Writes are atomic (temporary file +
rename, mode 0600) and merge with what other processes wrote meanwhile. The file is read as data
and checked (``TimingCache``): one another user could have written, or that is not a JSON object
of times, is ignored with a warning, never an error. Tests inject times with ``timer=``
(a callable, which bypasses the cache) or by pointing ``cache=`` at a prepared file.
"""

from __future__ import annotations

import json
import math
import os
import platform
import stat
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spion_fx.kernels.cache import permission_problem, writable_cache_dir
from spion_fx.kernels.nm.packed import PackedNMLinear

DEFAULT_TOKENS = 512  # batched inference / prefill; pass tokens=1..16 to choose for decoding
MODES = ("speed", "memory")
CUDA_KERNELS = ("dense", "cusparselt", "cutlass", "triton")
CPU_KERNELS = ("dense", "cpu")
PACKED_KERNELS = ("triton", "cpu")  # the kernels that compute from the packed N/M storage
CACHE_FILE = "nm_kernels.json"


@dataclass(frozen=True)
class LayerKey:
    """What a timing depends on."""

    device: str
    torch: str
    out_features: int
    in_features: int
    dtype: str
    nm: str
    tokens: int

    def entry(self, kernel: str) -> str:
        return "|".join(str(v) for v in (
            self.device, self.torch, f"{self.out_features}x{self.in_features}", self.dtype,
            self.nm, f"T{self.tokens}", kernel))


# timer(kernel, key, run) -> milliseconds; ``run`` computes the layer once on the timing input.
Timer = Callable[[str, LayerKey, Callable[[], object]], float]


@dataclass
class Choice:
    kernel: str
    times_ms: dict[str, float]
    rejected: dict[str, str] = field(default_factory=dict)  # kernel -> why it was not a candidate

    @property
    def vs_dense(self) -> float | None:
        """Dense time / chosen kernel's time (> 1: faster than dense)."""
        dense, ours = self.times_ms.get("dense"), self.times_ms.get(self.kernel)
        return None if dense is None or not ours else dense / ours

    def summary(self) -> str:
        times = ", ".join(f"{k} {v:.3g} ms" for k, v in sorted(self.times_ms.items(), key=lambda kv: kv[1]))
        skipped = "; ".join(f"{k}: {v}" for k, v in self.rejected.items())
        return times + (f" (not candidates: {skipped})" if skipped else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{platform.machine()}:{torch.get_num_threads()}threads"


def layer_key(weight: Tensor, n: int, m: int, tokens: int) -> LayerKey:
    out_f, in_f = weight.shape
    return LayerKey(device_name(weight.device), torch.__version__, int(out_f), int(in_f),
                    str(weight.dtype).replace("torch.", ""), f"{n}:{m}", int(tokens))


def candidate_kernels(device: torch.device, mode: str) -> tuple[str, ...]:
    """Kernels to consider on ``device``; ``memory`` keeps the packed N/M storage whatever it costs."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    kernels = CUDA_KERNELS if device.type == "cuda" else CPU_KERNELS
    return tuple(k for k in kernels if mode == "speed" or k in PACKED_KERNELS)


def measure_ms(run: Callable[[], object], device: torch.device, reps: int = 5, warmup: int = 2) -> float:
    """Median milliseconds of ``run()``: CUDA events on GPU, wall clock on CPU."""
    for _ in range(warmup):
        run()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            run()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


class TimingCache:
    """Milliseconds per ``LayerKey.entry(kernel)``, persisted as JSON.

    The file is read as data only and checked: one that is not a regular file owned by this user,
    is group- or world-writable, is not JSON, or is not an object of finite non-negative numbers,
    is ignored with a warning (once per file and reason) and overwritten by the next ``put``.
    Written with mode 0600 (its directory, when created here, 0700)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else writable_cache_dir() / CACHE_FILE
        self.entries = self._read()

    def _read(self) -> dict[str, float]:
        try:
            raw = self._read_bytes()
        except FileNotFoundError:
            return {}
        except (OSError, _Untrusted) as exc:
            self._warn(str(exc))
            return {}
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            self._warn(f"not valid JSON: {str(exc)[:100]}")
            return {}
        if not isinstance(data, dict):
            self._warn(f"expected a JSON object, got {type(data).__name__}")
            return {}
        for key, value in data.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                self._warn(f"entry {key[:80]!r} is {str(value)[:40]!r}, not a time in ms")
                return {}
        return {k: float(v) for k, v in data.items()}

    def _read_bytes(self) -> bytes:
        """The file's contents, checked on the open descriptor (so what is checked is what is read)."""
        nonblock = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted here must not block the reader
        fd = os.open(self.path, os.O_RDONLY | nonblock)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise _Untrusted(f"{self.path} is not a regular file")
            problem = permission_problem(self.path, st)
            if problem is not None:
                raise _Untrusted(problem)
            if st.st_size > _MAX_CACHE_BYTES:
                raise _Untrusted(f"{self.path} is {st.st_size} bytes, more than a timing cache holds")
            return f.read(_MAX_CACHE_BYTES + 1)

    def _warn(self, why: str) -> None:
        if (str(self.path), why) in _WARNED:
            return
        _WARNED.add((str(self.path), why))
        warnings.warn(
            f"spion_fx: ignoring the N:M timing cache {self.path} ({why}); kernels are measured "
            "again and the file rewritten",
            RuntimeWarning,
            stacklevel=4,
        )

    def get(self, entry: str) -> float | None:
        return self.entries.get(entry)

    def put(self, new: dict[str, float]) -> None:
        if not new:
            return
        merged = {**self._read(), **self.entries, **new}
        self.entries = merged
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".nm_kernels.", suffix=".json")
            with os.fdopen(fd, "w") as f:  # mkstemp's file is 0600
                json.dump(merged, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:  # a cache that cannot be written only costs re-measuring next time
            pass


class _Untrusted(Exception):
    """A timing cache file that another user could have written."""


_MAX_CACHE_BYTES = 16 << 20
_WARNED: set[tuple[str, str]] = set()


def _agrees(y: Tensor, ref: Tensor) -> bool:
    tol = 1e-4 if ref.dtype in (torch.float32, torch.float64) else 2e-2
    scale = float(ref.abs().max()) or 1.0
    return bool(torch.allclose(y.float(), ref.float(), rtol=tol, atol=tol * scale))


def _check(layer: nn.Module, x: Tensor, ref: Tensor) -> str | None:
    """None when the layer computes the dense masked product on the timing input."""
    try:
        y = layer(x)
    except Exception as exc:  # e.g. a library's shape minimum at this token count
        return f"failed to run: {exc}"[:200]
    return None if _agrees(y, ref) else "output differs from the dense masked reference"


def _build(kernel: str, masked: Tensor, bias: Tensor | None, n: int, m: int, mask: Tensor) -> tuple[nn.Module | None, str | None]:
    """(layer, None), or (None, why not) — the dense candidate has no layer of its own."""
    if kernel == "dense":
        return None, None
    try:
        layer = PackedNMLinear.from_dense(masked, bias, n, m, mask=mask, backend=kernel)
    except Exception as exc:  # a kernel library refusing this weight: not a candidate
        return None, f"failed to build: {exc}"[:200]
    if layer.backend != kernel:
        return None, layer.reason
    return layer, None


@torch.no_grad()
def choose_kernel(
    masked: Tensor, bias: Tensor | None, n: int, m: int, mask: Tensor, *, mode: str = "speed",
    tokens: int = DEFAULT_TOKENS, timer: Timer | None = None, cache: TimingCache | None = None,
    reps: int = 5,
) -> tuple[Choice, nn.Module | None]:
    """The fastest correct kernel for y = x·(W⊙M)ᵀ + b, W⊙M = ``masked`` [out, in].

    Returns the choice and the layer to install (None when the choice is dense: the caller keeps
    its own module with the masked weight). In ``memory`` mode only packed kernels are eligible,
    but dense is still timed so the report can say what the packed form costs."""
    if tokens < 1:
        raise ValueError(f"tokens={tokens}: expected a positive token count")
    device = masked.device
    key = layer_key(masked, n, m, tokens)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, masked.shape[1], generator=gen, device=device, dtype=torch.float32).to(masked.dtype)
    ref = F.linear(x, masked, bias)
    eligible = candidate_kernels(device, mode)
    to_time = dict.fromkeys(("dense", *eligible))
    times: dict[str, float] = {}
    rejected: dict[str, str] = {}
    layers: dict[str, nn.Module] = {}
    measured: dict[str, float] = {}
    for kernel in to_time:
        layer, why = _build(kernel, masked, bias, n, m, mask)
        if why is None and layer is not None:
            why = _check(layer, x, ref)
        if why is not None:
            rejected[kernel] = why
            continue
        run = (lambda: F.linear(x, masked, bias)) if layer is None else (lambda layer=layer: layer(x))
        if timer is not None:
            times[kernel] = float(timer(kernel, key, run))
        else:
            cached = cache.get(key.entry(kernel)) if cache is not None else None
            times[kernel] = cached if cached is not None else measure_ms(run, device, reps)
            if cached is None:
                measured[key.entry(kernel)] = times[kernel]
        if layer is not None:
            layers[kernel] = layer
    if cache is not None:
        cache.put(measured)
    pool = [k for k in eligible if k in times]
    if not pool:  # memory mode with no packed kernel here: dense is all that is left
        pool = ["dense"]
    best = min(pool, key=lambda k: times[k])
    return Choice(best, times, rejected), layers.get(best)
