"""Compile the Triton attention kernels for a GPU target on a machine without one.

    python benchmarks/triton_aot.py [--arch 90] [--quick]      (TRITON_INTERPRET must be unset)

Runs the launchers on CPU tensors with the launch itself replaced by a recorder, then compiles
each recorded launch with ``triton.compile`` for ``cuda:<arch>`` (frontend, LLVM, ptxas -- all
shipped with Triton), applying the argument specialisation Triton applies at a real launch
(integers equal to 1 become constants, multiples of 16 and 16-byte-aligned pointers get
divisibility hints, except the arguments a kernel opts out of). Prints, per kernel: tiles,
compile time, shared memory, registers and spill stack from ``cuobjdump -res-usage``, and
whether the kv loads were software-pipelined (async copies).

What it catches without a GPU: code the interpreter accepts but the compiler rejects, register
spills of a tile choice, loops that lost their pipelining. What it cannot: speed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_POINTER_TYPES = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "int32": "*i32",
                  "uint8": "*u8", "int64": "*i64", "bool": "*u8"}


def _resource_usage(cubin: bytes) -> dict[str, int]:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True,
                             check=False).stdout
    match = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return {"registers": int(match.group(1)), "spill_stack": int(match.group(2))} if match else {}


def compile_launch(kernel: Any, kind: str, args: tuple, constexprs: dict, tiles: Any,
                   arch: int) -> dict[str, Any]:
    """Compile one recorded launch for ``cuda:arch``; returns what the compiler reports."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from spion_fx.kernels.attention import triton_attention as ta

    unspecialised = set(ta.UNSPECIALISED[kind])
    signature: dict[str, str] = {}
    constants = dict(constexprs, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n)
    attrs: dict[tuple[int, ...], list] = {}
    for index, (name, value) in enumerate(zip(kernel.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[str(value.dtype).removeprefix("torch.")]
            if value.data_ptr() % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and name not in unspecialised:
                signature[name] = "constexpr"
                constants[name] = 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and name not in unspecialised:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: unexpected launch argument {type(value).__name__}")
    for name in constants:
        signature[name] = "constexpr"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})
    ttgir = compiled.asm["ttgir"]
    return {
        "seconds": time.perf_counter() - start,
        "shared": compiled.metadata.shared,
        "async_copies": ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy"),
        **_resource_usage(compiled.asm["cubin"]),
    }


def record_launches(head_dim: int, length: int, block: int, causal: bool, padding: bool,
                    dropout: float, heads: int = 16, kv_heads: int | None = None,
                    dtype: str = "bfloat16", sm_count: int = 132,
                    compat: bool = False) -> list[tuple]:
    """(kernel, kind, args, constexprs, tiles) of one forward + backward, nothing launched."""
    import torch

    from spion_fx.kernels.attention import triton_attention as ta
    from spion_fx.kernels.attention.layout import BlockLayout

    if ta.INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    recorded: list[tuple] = []
    saved = ta._launch, ta._device_sms
    ta._launch = lambda kernel, kind, rows, others, tiles, args, constexprs: recorded.append(
        (kernel, kind, args, constexprs, tiles))
    ta._device_sms = lambda device: sm_count
    try:
        dt = getattr(torch, dtype)
        q = torch.zeros(1, heads, length, head_dim, dtype=dt)
        k = torch.zeros(1, kv_heads or heads, length, head_dim, dtype=dt)
        n = -(-length // block)
        grid = (torch.rand(n, n, generator=torch.Generator().manual_seed(0)) < 0.1) \
            | torch.eye(n, dtype=torch.bool)
        lay = BlockLayout.from_dense(grid, block)
        mask = torch.ones(1, length, dtype=torch.bool) if padding else None
        args = (lay.kv_num_blocks, lay.kv_indices, lay.q_num_blocks, lay.q_indices, block,
                head_dim ** -0.5, causal, mask, dropout, torch.tensor(5), compat)
        out, lse = ta.triton_block_sparse_fwd(q, k, k, *args)
        ta.triton_block_sparse_bwd(q, q, k, k, out, lse, *args)
    finally:
        ta._launch, ta._device_sms = saved
    return recorded


QUICK = [dict(head_dim=64, length=4096, block=128, causal=True, padding=True, dropout=0.1)]
FULL = QUICK + [
    dict(head_dim=64, length=8192, block=128, causal=False, padding=False, dropout=0.0),
    dict(head_dim=64, length=2048, block=128, causal=False, padding=False, dropout=0.0),
    dict(head_dim=128, length=8192, block=128, causal=False, padding=False, dropout=0.0),
    dict(head_dim=128, length=2048, block=128, causal=True, padding=True, dropout=0.1),
    dict(head_dim=64, length=8192, block=64, causal=True, padding=False, dropout=0.1),
    dict(head_dim=128, length=8192, block=128, causal=True, padding=False, dropout=0.0,
         kv_heads=4),
    dict(head_dim=64, length=1024, block=128, causal=False, padding=False, dropout=0.0,
         dtype="float32"),
    dict(head_dim=64, length=1024, block=16, causal=True, padding=True, dropout=0.1),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100)")
    parser.add_argument("--quick", action="store_true", help="one variant (causal, padding, "
                        "dropout: every code path) instead of the grid")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("triton_aot.py compiles real kernels: unset TRITON_INTERPRET")
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    for case in QUICK if args.quick else FULL:
        for kernel, kind, launch_args, constexprs, tiles in record_launches(**case):
            report = compile_launch(kernel, kind, launch_args, constexprs, tiles, args.arch)
            label = " ".join(f"{k}={v}" for k, v in case.items())
            print(f"{kind:4s} {label} tiles=({tiles.block_m},{tiles.block_n}) "
                  f"warps={tiles.num_warps} stages={tiles.num_stages}: "
                  + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in report.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
