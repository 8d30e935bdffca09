"""Where spion_fx keeps what it builds or measures per machine (the native CPU kernel, N:M kernel
timings): ``$SPION_FX_CACHE_DIR``, else ``$XDG_CACHE_HOME/spion_fx`` or ``~/.cache/spion_fx``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("SPION_FX_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "spion_fx"


def writable_cache_dir() -> Path:
    """The cache directory, or a per-user temporary one where it cannot be created (a read-only
    home on a CI runner, say)."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"spion_fx-{os.getuid() if hasattr(os, 'getuid') else 0}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback
