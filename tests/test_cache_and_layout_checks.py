"""What spion_fx refuses to trust: a kernel cache directory or cached kernel another user could
have written, a timing cache that is not what this process wrote, and a hand-built BlockLayout
whose kv rows and q columns disagree. "Another user" is played without root by patching
``cache._owned_by_me``, and by real mode 0o777 / 0o666 directories and files."""

from __future__ import annotations

import json
import os
import shutil
import stat
import warnings

import pytest
import torch

from spion_fx.kernels import BlockLayout, block_sparse_attention
from spion_fx.kernels import cache as kcache
from spion_fx.kernels.attention import layout as layout_module
from spion_fx.kernels.attention import native_cpu
from spion_fx.lowering import nm_select

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _foreign(monkeypatch, *paths) -> None:
    """Make ``paths`` look owned by another user."""
    inodes = {os.stat(p).st_ino for p in paths}
    monkeypatch.setattr(kcache, "_owned_by_me", lambda st: st.st_ino not in inodes)


@pytest.fixture
def tmpdir_in(tmp_path, monkeypatch):
    """tempfile.gettempdir() under tmp_path, so fallback directories stay in the test's folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(kcache.tempfile, "gettempdir", lambda: str(tmp))
    return tmp


# ----------------------------------------------------------------------------- cache directory


def test_cache_dir_is_created_private(tmp_path, monkeypatch):
    monkeypatch.setenv("SPION_FX_CACHE_DIR", str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kcache.writable_cache_dir() == tmp_path / "cache"
    assert _mode(tmp_path / "cache") == 0o700


def test_world_writable_cache_dir_is_not_used(tmp_path, monkeypatch, tmpdir_in):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("SPION_FX_CACHE_DIR", str(shared))
    with pytest.warns(RuntimeWarning, match="group- or world-writable"):
        chosen = kcache.writable_cache_dir()
    assert chosen != shared and chosen.parent == tmpdir_in and _mode(chosen) == 0o700
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, not one per use
        assert kcache.writable_cache_dir() == chosen


def test_someone_elses_fallback_dir_gives_a_fresh_private_one(tmp_path, monkeypatch, tmpdir_in):
    # The case: the cache cannot be created, and /tmp/spion_fx-<uid> was made by another
    # user (open to all): never used, a fresh mkdtemp directory instead.
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("SPION_FX_CACHE_DIR", str(blocked / "cache"))
    planted = tmpdir_in / f"spion_fx-{os.geteuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    _foreign(monkeypatch, planted)
    with pytest.warns(RuntimeWarning, match="owned by uid .* not by you") as record:
        chosen = kcache.writable_cache_dir()
    assert len(record) == 1
    assert chosen not in (planted, blocked / "cache") and chosen.parent == tmpdir_in
    assert _mode(chosen) == 0o700 and kcache.dir_problem(chosen) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kcache.writable_cache_dir() == chosen  # the same one for the whole process


@needs_compiler
def test_native_kernel_is_not_built_into_an_open_directory(tmp_path, monkeypatch, tmpdir_in):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("SPION_FX_CACHE_DIR", str(shared))
    monkeypatch.setattr(native_cpu, "_state", {})
    with pytest.warns(RuntimeWarning, match="world-writable"):
        assert native_cpu.library() is not None
    assert not list(shared.iterdir())
    (built,) = tmpdir_in.glob("spion_fx-*/block_sparse_attention_*.so")
    assert kcache.file_problem(built) is None


# ----------------------------------------------------------------------------- cached kernel


@pytest.fixture(scope="module")
def built_kernel(tmp_path_factory):
    """One build of the native kernel: (its cache file name, its bytes)."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    where = tmp_path_factory.mktemp("build")
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("SPION_FX_CACHE_DIR", str(where))
        mp.setattr(native_cpu, "_state", {})
        assert native_cpu.library() is not None
    finally:
        mp.undo()
    (so,) = where.glob("block_sparse_attention_*.so")
    return so.name, so.read_bytes()


@pytest.mark.parametrize("planted", ["symlink", "foreign", "group-writable"])
def test_cached_kernel_is_checked_before_loading(planted, built_kernel, tmp_path, monkeypatch):
    name, data = built_kernel
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    target = cache / name
    elsewhere = tmp_path / "elsewhere.so"
    elsewhere.write_bytes(data)
    if planted == "symlink":
        target.symlink_to(elsewhere)
        match = "is a symlink"
    else:
        target.write_bytes(data)
        target.chmod(0o775 if planted == "group-writable" else 0o700)
        match = "group- or world-writable" if planted == "group-writable" else "owned by uid"
        if planted == "foreign":
            _foreign(monkeypatch, target)
    monkeypatch.setenv("SPION_FX_CACHE_DIR", str(cache))
    monkeypatch.setattr(native_cpu, "_state", {})
    with pytest.warns(RuntimeWarning, match=match):
        assert native_cpu.library() is not None
    # rebuilt in place: a private regular file of ours, not what was planted
    assert not target.is_symlink() and kcache.file_problem(target) is None
    assert _mode(target) == 0o700


def test_file_problem_names_each_case(tmp_path, monkeypatch):
    good = tmp_path / "good"
    good.write_bytes(b"x")
    good.chmod(0o600)
    assert kcache.file_problem(good) is None
    link = tmp_path / "link"
    link.symlink_to(good)
    assert "symlink" in kcache.file_problem(link)
    assert "not a regular file" in kcache.file_problem(tmp_path)
    good.chmod(0o606)
    assert "world-writable" in kcache.file_problem(good)
    good.chmod(0o600)
    _foreign(monkeypatch, good)
    assert "owned by uid" in kcache.file_problem(good)


# ----------------------------------------------------------------------------- timing cache


@pytest.mark.parametrize(
    "text, why",
    [
        ("{not json", "not valid JSON"),
        ("\xff\xfe", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"a|cpu": "fast"}', "not a time"),
        ('{"a|cpu": {"ms": 1}}', "not a time"),
        ('{"a|cpu": true}', "not a time"),
        ('{"a|cpu": NaN}', "not a time"),
        ('{"a|cpu": -1}', "not a time"),
        ("[" * 100000 + "]" * 100000, "not valid JSON"),
    ],
)
def test_malformed_timing_cache_is_ignored(text, why, tmp_path):
    path = tmp_path / "t.json"
    path.write_bytes(text.encode("latin-1"))
    path.chmod(0o600)
    with pytest.warns(RuntimeWarning, match=why):
        cache = nm_select.TimingCache(path)
    assert cache.entries == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once for this file, also when put() re-reads it
        cache.put({"k": 1.0})
    assert json.loads(path.read_text()) == {"k": 1.0} and _mode(path) == 0o600
    assert nm_select.TimingCache(path).get("k") == 1.0


@pytest.mark.parametrize("how", ["foreign", "world-writable", "fifo"])
def test_timing_cache_another_user_could_write_is_ignored(how, tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    if how == "fifo":
        os.mkfifo(path, 0o600)
        match = "not a regular file"
    else:
        path.write_text(json.dumps({"dev|cpu": 0.001}))
        path.chmod(0o666 if how == "world-writable" else 0o600)
        match = "world-writable" if how == "world-writable" else "owned by uid"
        if how == "foreign":
            _foreign(monkeypatch, path)
    with pytest.warns(RuntimeWarning, match=match):
        cache = nm_select.TimingCache(path)
    assert cache.get("dev|cpu") is None


def test_default_timing_cache_dir_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("SPION_FX_CACHE_DIR", str(tmp_path / "c"))
    cache = nm_select.TimingCache()
    cache.put({"k": 2.0})
    assert _mode(tmp_path / "c") == 0o700 and _mode(cache.path) == 0o600
    assert nm_select.TimingCache().get("k") == 2.0


# ----------------------------------------------------------------------------- block layouts


def _grid(seed: int, heads=2, n=4) -> torch.Tensor:
    grid = torch.rand(heads, n, n, generator=torch.Generator().manual_seed(seed)) < 0.4
    grid[:, torch.arange(n), torch.arange(n)] = True
    return grid


def _qkv(heads=2, n=4, block=8, d=8):
    gen = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(1, heads, n * block, d, generator=gen, dtype=torch.float64).requires_grad_(True)
        for _ in range(3)
    )


def test_layout_with_disagreeing_halves_is_refused():
    rows = BlockLayout.from_dense(_grid(1), 8)
    grid = _grid(1)
    grid[1, 0, 3] = ~grid[1, 0, 3]
    cols = BlockLayout.from_dense(grid, 8)
    hand = BlockLayout(rows.kv_num_blocks, rows.kv_indices, cols.q_num_blocks, cols.q_indices, 8)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"halves disagree.*head 1, q block 0, kv block 3"):
        block_sparse_attention(q, k, v, hand)


@pytest.mark.parametrize(
    "break_it, match",
    [
        (lambda t: t["q_num_blocks"].add_(1), "q_num_blocks must be in"),
        (lambda t: t["q_indices"].fill_(9), "q_indices must be in"),
        (lambda t: t["kv_indices"].copy_(t["kv_indices"].flip(-1)), "strictly ascending"),
        (lambda t: t.update(q_num_blocks=t["q_num_blocks"][:1]), "number of heads"),
        (lambda t: t.update(q_indices=t["q_indices"][:, :3]), "q columns disagree"),
    ],
)
def test_malformed_hand_built_layout_is_refused(break_it, match):
    full = BlockLayout.from_dense(torch.ones(2, 4, 4, dtype=torch.bool), 8)
    tensors = {n: getattr(full, n).clone() for n in ("kv_num_blocks", "kv_indices", "q_num_blocks", "q_indices")}
    break_it(tensors)
    hand = BlockLayout(**tensors, block_size=8)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, v, hand)


def test_verified_layouts_are_not_read_and_hand_built_ones_once(monkeypatch):
    calls = []
    real = layout_module._check_consistent
    monkeypatch.setattr(layout_module, "_check_consistent", lambda lay: (calls.append(1), real(lay)))
    q, k, v = _qkv()
    built = BlockLayout.from_dense(_grid(2), 8)
    block_sparse_attention(q, k, v, built)
    # an attention site rebuilds its layout around the same tensors at every call
    block_sparse_attention(q, k, v, BlockLayout(*built._tensors(), 8))
    block_sparse_attention(q, k, v, BlockLayout.lower_triangular(4, 8))
    assert calls == []
    hand = BlockLayout(*(t.clone() for t in built._tensors()), 8)
    assert not hand.is_verified
    out = block_sparse_attention(q, k, v, hand)
    block_sparse_attention(q, k, v, hand)
    assert calls == [1] and hand.is_verified
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, built))
    # an in-place edit undoes the verification
    hand.q_num_blocks[0, 0] += 1
    with pytest.raises(ValueError):
        block_sparse_attention(q, k, v, hand)

