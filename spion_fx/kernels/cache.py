"""Where spion_fx keeps what it builds or measures per machine (the native CPU kernel, N:M kernel
timings): ``$SPION_FX_CACHE_DIR``, else ``$XDG_CACHE_HOME/spion_fx`` or ``~/.cache/spion_fx``;
where that cannot be created or written, ``<tmp>/spion_fx-<uid>``.

The native kernel is a shared library loaded into the process, so the cache is only used when no
other user could have written into it: a directory is created with mode 0700, and one that the
current user does not own, or that is group- or world-writable, is passed over (next the per-user
temporary directory, else a fresh ``tempfile.mkdtemp`` one, removed at exit), with one warning
saying why. Files read from the cache are checked the same way (``file_problem``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile
import threading
import warnings
from pathlib import Path

_lock = threading.Lock()
_fresh: dict[Path, Path] = {}  # insecure cache path -> the private directory used instead
_warned: set[str] = set()


def cache_dir() -> Path:
    root = os.environ.get("SPION_FX_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "spion_fx"


def _uid() -> int:
    return os.geteuid() if hasattr(os, "geteuid") else 0


def _owned_by_me(st: os.stat_result) -> bool:
    """Whether the current (effective) user owns the file ``st`` describes; a separate function
    so that tests can play "someone else's file" without root."""
    return not hasattr(os, "geteuid") or st.st_uid == os.geteuid()


def permission_problem(path: Path, st: os.stat_result) -> str | None:
    """Why a file or directory with status ``st`` could have been written by another user: not
    owned by the current user, or group- or world-writable. None when only this user can."""
    if not _owned_by_me(st):
        return f"{path} is owned by uid {st.st_uid}, not by you (uid {_uid()})"
    if os.name != "nt" and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def dir_problem(path: Path) -> str | None:
    """Why ``path`` must not be used as a cache directory, or None when it is a directory that
    only the current user can write."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    return permission_problem(path, st)


def file_problem(path: Path) -> str | None:
    """Why the cached file ``path`` must not be loaded or read, or None when it is a regular file
    (not a symlink) that only the current user can write."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symlink"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    return permission_problem(path, st)


def _usable(directory: Path) -> tuple[bool, str | None]:
    """(usable, why not when it exists but is not private). Creates the directory, mode 0700."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        return False, None  # cannot be created (a read-only home on a CI runner): no warning
    problem = dir_problem(directory)
    if problem is not None:
        return False, problem
    return os.access(directory, os.W_OK | os.X_OK), None


def writable_cache_dir() -> Path:
    """The cache directory if it is private and writable; else the per-user temporary one; else a
    fresh private directory (one per process and configuration). Passing over a directory that
    exists but is not private warns once."""
    directory = cache_dir()
    with _lock:
        fresh = _fresh.get(directory)
        if fresh is not None and dir_problem(fresh) is None:
            return fresh
        reasons = []
        fallback = Path(tempfile.gettempdir()) / f"spion_fx-{_uid()}"
        for candidate in (directory, fallback):
            ok, problem = _usable(candidate)
            if ok:
                if reasons:
                    _warn(reasons, candidate)
                return candidate
            if problem is not None:
                reasons.append(problem)
        fresh = Path(tempfile.mkdtemp(prefix="spion_fx-"))
        atexit.register(shutil.rmtree, fresh, True)
        _fresh[directory] = fresh
        if reasons:
            _warn(reasons, fresh)
        return fresh


def _warn(reasons: list[str], used: Path) -> None:
    why = "; ".join(reasons)
    if why in _warned:
        return
    _warned.add(why)
    warnings.warn(
        f"spion_fx: not using the kernel cache directory ({why}): another user could "
        f"place code there; using {used} instead (make the cache directory yours with mode 0700, "
        "or set SPION_FX_CACHE_DIR)",
        RuntimeWarning,
        stacklevel=3,
    )
