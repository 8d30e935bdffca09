"""The native CPU block-sparse attention kernel (``csrc/block_sparse_attention.cpp``).

Built on first use with the system C++ compiler into a per-user cache and loaded with ctypes;
plain C++ with no PyTorch headers compiles in about a second. Only a regular file owned by this
user, that no one else can write, in a private cache directory (``kernels/cache.py``) is loaded;
a cached entry that is not is rebuilt, with a warning. Its GEMMs call the BLAS that
PyTorch itself links (``sgemm_``/``dgemm_`` looked up in libtorch_cpu), its threads are
PyTorch's OpenMP pool (``torch.get_num_threads()``).

It serves every call but SPION-compat: float32 and float64 natively, bfloat16 and float16
computed in float32 (the conversions cost far less than the grouped kernel's bf16 path: measured
2x faster at L=4096), attention dropout with a counter-hash keep mask (``dropout_keep_mask``)
that the backward redraws from the seed. Compat, and every call when no compiler or BLAS symbol
is found, take the grouped kernel in ``block_sparse_cpu`` (a warning says why, once).
``SPION_FX_CPU_KERNEL=grouped`` (or ``use_kernel("grouped")``) forces the grouped kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from spion_fx.kernels.cache import file_problem, writable_cache_dir

SOURCE = Path(__file__).with_name("csrc") / "block_sparse_attention.cpp"
_FLAGS = (
    "-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
)  # fmt: skip
_ABI_VERSION = 4
# Most keys one GEMM covers when kv blocks are consecutive: 512 keys x 64 rows of scores stay in
# L2 next to the q/k/v tiles (benchmarks/attention_cpu.py measured 256-1024 within noise).
MAX_RUN_KEYS = 512
_DTYPES = {torch.float32: 0, torch.float64: 1}  # the kernel's own
_COMPUTE = {
    torch.float32: torch.float32, torch.float64: torch.float64,
    torch.bfloat16: torch.float32, torch.float16: torch.float32,
}  # fmt: skip

_KERNEL_ENV = "SPION_FX_CPU_KERNEL"
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_features() -> str:
    """What -march=native depends on, so a cache shared between machines never hands one
    machine's build to another CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _march_flags(compiler: str) -> list[str]:
    probe = subprocess.run(
        [compiler, "-march=native", "-x", "c++", "-E", "-o", os.devnull, os.devnull],
        capture_output=True,
    )
    return ["-march=native"] if probe.returncode == 0 else []


def _build(compiler: str) -> Path:
    flags = [*_FLAGS, *_march_flags(compiler)]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join(
            x.encode() for x in (SOURCE.read_text(), " ".join(flags), version, _cpu_features())
        )
    ).hexdigest()[:16]
    target = writable_cache_dir() / f"block_sparse_attention_{key}.so"
    if os.path.lexists(target):
        problem = file_problem(target)
        if problem is None:
            return target
        # The directory is private (writable_cache_dir checked it), so the entry is ours to
        # replace; what it points to or holds is never loaded.
        warnings.warn(
            f"spion_fx: not loading the cached native kernel ({problem}); rebuilding it",
            RuntimeWarning,
            stacklevel=4,
        )
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed:\n{result.stderr[-2000:]}")
        os.chmod(built, 0o700)  # whatever the umask: only this user may replace it
        os.replace(built, target)  # atomic: concurrent builders never load a partial file
    return target


def _blas_symbols() -> tuple[int, int]:
    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / _shared_name("torch_cpu")))
    return (
        ctypes.cast(lib.sgemm_, ctypes.c_void_p).value,
        ctypes.cast(lib.dgemm_, ctypes.c_void_p).value,
    )


def _shared_name(stem: str) -> str:
    return {"Darwin": f"lib{stem}.dylib", "Windows": f"{stem}.dll"}.get(
        platform.system(), f"lib{stem}.so"
    )


def _load() -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    sgemm, dgemm = _blas_symbols()
    path = _build(compiler)
    problem = file_problem(path)  # checked again right before loading it into this process
    if problem is not None:
        raise RuntimeError(f"refusing to load {problem}")
    lib = ctypes.CDLL(str(path))
    if lib.spion_bsa_abi_version() != _ABI_VERSION:
        raise RuntimeError("stale kernel build in the cache")
    lib.spion_bsa_set_blas(ctypes.c_void_p(sgemm), ctypes.c_void_p(dgemm))
    lib.spion_bsa_forward.restype = ctypes.c_int
    lib.spion_bsa_backward.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (with one warning) when it cannot be built here."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                try:
                    _state["lib"] = _load()
                except Exception as exc:  # any failure means: use the grouped kernel
                    _state["lib"] = None
                    warnings.warn(
                        f"spion_fx: native CPU attention kernel unavailable ({exc}); "
                        "using the grouped kernel",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return _state["lib"]  # type: ignore[return-value]


def preload() -> None:
    """Build or load the kernel in a background thread, once per process.

    Loading runs the compiler's probes and, the first time on a machine, the build itself
    (seconds); a model that will switch to sparse attention later starts this when it is
    sparsified, so the switch step does not wait for it. ``library()`` takes the same lock.
    """
    if "lib" in _state or _state.get("preloading"):
        return
    _state["preloading"] = True
    threading.Thread(target=library, name="spion_fx-native-kernel", daemon=True).start()


@contextlib.contextmanager
def use_kernel(name: str) -> Iterator[None]:
    """Run the enclosed calls on one CPU kernel, "native" or "grouped" (sets
    ``SPION_FX_CPU_KERNEL``, which ``handles`` reads at every call; restored on exit)."""
    if name not in ("native", "grouped"):
        raise ValueError(f"CPU kernel must be 'native' or 'grouped', got {name!r}")
    before = os.environ.get(_KERNEL_ENV)
    os.environ[_KERNEL_ENV] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_KERNEL_ENV, None)
        else:
            os.environ[_KERNEL_ENV] = before


def handles(dtype: torch.dtype, compat: bool) -> bool:
    """Whether a call with these inputs runs on the native kernel."""
    if os.environ.get(_KERNEL_ENV, "native") == "grouped":
        return False
    if dtype not in _COMPUTE or compat:
        return False
    return library() is not None


# ----------------------------------------------------------------------------- calls


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A [B, heads, L, D] operand the kernel can read in place (its dtype, unit stride on D)."""
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor):
    return (ctypes.c_int64 * 3)(*t.stride()[:3])


def _check_layout(
    kv_num: torch.Tensor, kv_idx: torch.Tensor, batch: int, heads: int, nqb: int, nkb: int
):
    """The C++ kernel indexes memory with these numbers: refuse any that would leave q/k/v
    (the op can be called directly, past ``block_sparse_attention``'s validation). The kv rows
    are [B', H', nQB] / [B', H', nQB, maxK] here (a shared layout gains B' = 1)."""
    if kv_num.dim() != 3 or kv_idx.dim() != 4 or kv_num.shape != kv_idx.shape[:3]:
        raise ValueError(f"bad layout shapes {tuple(kv_num.shape)} / {tuple(kv_idx.shape)}")
    if kv_num.shape[0] not in (1, batch):
        raise ValueError(f"layout batch dim {kv_num.shape[0]} does not fit batch {batch}")
    if kv_num.shape[1] not in (1, heads) or kv_num.shape[2] != nqb:
        raise ValueError(
            f"layout rows {tuple(kv_num.shape[1:])} do not fit {heads} heads x {nqb} blocks"
        )
    if kv_num.numel() and (int(kv_num.min()) < 0 or int(kv_num.max()) > kv_idx.shape[3]):
        raise ValueError("kv_num_blocks out of range")
    if kv_idx.numel() and (int(kv_idx.min()) < 0 or int(kv_idx.max()) >= nkb):
        raise ValueError(f"kv_indices out of range [0, {nkb})")


class _Call:
    """The arguments shared by forward and backward."""

    def __init__(
        self, q, k, kv_num_blocks, kv_indices, block, scale, causal, key_padding_mask, dropout_p,
        seed,
    ):  # fmt: skip
        b, h, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        if kv_num_blocks.dim() == 2:  # shared by the batch
            kv_num_blocks, kv_indices = kv_num_blocks.unsqueeze(0), kv_indices.unsqueeze(0)
        self.kv_num = kv_num_blocks.to(torch.int32).contiguous()
        self.kv_idx = kv_indices.to(torch.int32).contiguous()
        self.key_mask = (
            None
            if key_padding_mask is None
            else key_padding_mask.to(torch.bool).contiguous().view(torch.uint8)
        )
        nkb = -(-lk // block)
        _check_layout(self.kv_num, self.kv_idx, b, h, -(-lq // block), nkb)
        if h % hkv != 0 or k.shape[0] != b or k.shape[3] != d:
            raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, lk):
            raise ValueError(f"key_padding_mask must be [B={b}, Lk={lk}]")
        self.shape = (ctypes.c_int64 * 6)(b, h, hkv, lq, lk, d)
        self.layout = (ctypes.c_int64 * 5)(*self.kv_idx.shape, block)
        self.threads = torch.get_num_threads()
        self.head_args = (
            _DTYPES[q.dtype], self.shape, self.layout, _ptr(self.kv_num), _ptr(self.kv_idx),
            ctypes.c_double(scale), ctypes.c_int(int(causal)), _ptr(self.key_mask),
            ctypes.c_double(dropout_p), ctypes.c_uint64(_seed_bits(seed)),
            ctypes.c_int64(MAX_RUN_KEYS), ctypes.c_int(self.threads),
        )  # fmt: skip


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block: int,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = q.dtype
    q, k, v = (_rows(t, _COMPUTE[dtype]) for t in (q, k, v))
    call = _Call(
        q, k, kv_num_blocks, kv_indices, block, scale, causal, key_padding_mask, dropout_p, seed
    )
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    status = library().spion_bsa_forward(
        *call.head_args, _ptr(q), _strides(q), _ptr(k), _strides(k), _ptr(v), _strides(v),
        _ptr(out), _strides(out), _ptr(lse),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"native block-sparse forward failed for {q.dtype}")
    return out.to(dtype), lse


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block: int,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = q.dtype
    grad_out, q, k, v, out = (_rows(t, _COMPUTE[dtype]) for t in (grad_out, q, k, v, out))
    lse = lse.to(torch.float32).contiguous()
    call = _Call(
        q, k, kv_num_blocks, kv_indices, block, scale, causal, key_padding_mask, dropout_p, seed
    )
    b, hkv = k.shape[0], k.shape[1]
    # A work unit owns one kv head's dK/dV; with fewer kv heads than ~2 per thread the query
    # blocks are split in chunks that accumulate into separate slices, summed here.
    chunks = 1
    if b * hkv < 2 * call.threads:
        chunks = max(1, min(kv_indices.shape[-2], -(-2 * call.threads // (b * hkv))))
    dq = torch.empty(q.shape, dtype=q.dtype)
    dk = torch.zeros((chunks, *k.shape), dtype=q.dtype)
    dv = torch.zeros((chunks, *k.shape), dtype=q.dtype)
    status = library().spion_bsa_backward(
        *call.head_args, _ptr(grad_out), _strides(grad_out), _ptr(q), _strides(q), _ptr(k),
        _strides(k), _ptr(v), _strides(v), _ptr(out), _strides(out), _ptr(lse), _ptr(dq),
        _strides(dq), _ptr(dk), _ptr(dv), ctypes.c_int64(chunks),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"native block-sparse backward failed for {q.dtype}")
    dk, dv = (dk.sum(0), dv.sum(0)) if chunks > 1 else (dk[0], dv[0])
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


# ----------------------------------------------------------------------------- dropout mask

_U32 = 0xFFFFFFFF


def _seed_bits(seed: torch.Tensor | int) -> int:
    return int(seed) & 0xFFFFFFFFFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """csrc's fmix32 on int64 tensors holding uint32 values (products wrap; the low 32 bits
    are what is kept)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _U32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _U32
    return h ^ (h >> 16)


def dropout_keep_mask(
    batch: int, heads: int, q_len: int, kv_len: int, dropout_p: float, seed: torch.Tensor | int
) -> torch.Tensor:
    """The keep mask (bool [B, H, Lq, Lk]) the native kernel draws for this seed: element
    (b, h, i, j) is kept iff fmix32(row_hash ^ j * 0x9E3779B9) >= floor(p * 2^32), row_hash mixing
    the seed with the row id (b*H + h)*Lq + i. For tests and debugging."""
    bits = _seed_bits(seed)
    row = torch.arange(batch * heads * q_len, dtype=torch.int64)
    lo = _fmix32((row & _U32) ^ (bits & _U32))
    row_hash = _fmix32(lo ^ (row >> 32) ^ (bits >> 32))
    key = (torch.arange(kv_len, dtype=torch.int64) * 0x9E3779B9) & _U32
    mixed = _fmix32(row_hash[:, None] ^ key[None, :])
    threshold = min(math.floor(dropout_p * 2.0**32), _U32)
    return (mixed >= threshold).view(batch, heads, q_len, kv_len)
