"""Byte-level text corpora for the demo and the benchmarks.

The default corpus needs no download: it is the Python standard library's own source (the
top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``, sorted by name, ~4–5 MB), so every
machine with the same Python version trains on the same bytes. Files, not bytes, are split into
train and validation, so validation text is never a continuation of a training window.
``--data PATH`` swaps in any local text file or folder.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MAX_BYTES = 6_000_000  # caps the corpus so load time and memory stay trivial
VALIDATION_EVERY = 10  # every 10th file (in sorted order) is held out for validation
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".csv", ".html", ".c", ".h", ".toml")


@dataclass
class Corpus:
    """Train and validation bytes as flat uint8 tensors, plus where they came from."""

    train: torch.Tensor
    validation: torch.Tensor
    source: str
    files: int

    def describe(self) -> str:
        return (
            f"{self.source}: {self.files} files, {self.train.numel() / 1e6:.2f} MB train, "
            f"{self.validation.numel() / 1e6:.2f} MB validation"
        )


def stdlib_files() -> list[Path]:
    """The default corpus's files: top-level stdlib modules, sorted for determinism."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"data path {str(path)!r} is neither a file nor a folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"data folder {str(path)!r} has no text files ({', '.join(TEXT_SUFFIXES)})")
    return files


def _as_tensor(chunks: list[bytes]) -> torch.Tensor:
    data = bytearray(b"\n".join(chunks))
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(data, dtype=torch.uint8).clone()


def _split_single(data: bytes, fraction: float = 0.1) -> tuple[bytes, bytes]:
    # One file cannot be split by file: hold out its tail instead.
    cut = int(len(data) * (1.0 - fraction))
    return data[:cut], data[cut:]


def load_corpus(path: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Corpus:
    """Load the stdlib corpus (``path=None``) or a local text file / folder, split by file."""
    files = stdlib_files() if path is None else _files_under(Path(path))
    source = "python stdlib source" if path is None else str(path)
    train: list[bytes] = []
    validation: list[bytes] = []
    total = 0
    for index, file in enumerate(files):
        if total >= max_bytes:
            break
        data = file.read_bytes()[: max_bytes - total]
        total += len(data)
        (validation if index % VALIDATION_EVERY == VALIDATION_EVERY - 1 else train).append(data)
    used = len(train) + len(validation)
    if not validation:
        head, tail = _split_single(b"\n".join(train))
        train, validation = [head], [tail]
    return Corpus(_as_tensor(train), _as_tensor(validation), source, used)


def sample_batch(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``seq_len + 1`` bytes: inputs are the first L, targets the last L."""
    if data.numel() < seq_len + 2:
        raise ValueError(
            f"seq_len={seq_len} needs at least {seq_len + 2} bytes of text, the split has {data.numel()}"
        )
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    windows = data[starts[:, None] + offsets].long()
    return windows[:, :-1], windows[:, 1:]


class BatchSampler:
    """An endless, seeded stream of training batches (the same seed gives the same batches)."""

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0) -> None:
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_batch(self.data, self.batch_size, self.seq_len, self.generator)


def fixed_batches(
    data: torch.Tensor, count: int, batch_size: int, seq_len: int, seed: int = 1234
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: the same windows at every evaluation, so losses are comparable."""
    generator = torch.Generator().manual_seed(seed)
    return [sample_batch(data, batch_size, seq_len, generator) for _ in range(count)]
