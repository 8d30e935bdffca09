"""Kernel selection for finalized N:M layers: candidates, the correctness gate, the disk cache, and
finalize() with injected timings (the real GPU figures are in benchmarks/gpu_nm.py)."""

from __future__ import annotations

import json

import pytest
import torch
from test_nm_packed import Conv1D  # GPT-2 style [in, out] weight, shared with the packing tests
from torch import nn

from spion_fx.kernels.nm.packed import PackedNMLinear
from spion_fx.lowering import nm_select
from spion_fx.lowering.finalize import finalize
from spion_fx.policy import LinearPolicy
from spion_fx.reporting import print_report
from spion_fx.runtime.linear_controller import LinearSparsityController
from spion_fx.runtime.nm import nm_mask


def _masked(out_f=32, in_f=64, n=2, m=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    mask = nm_mask(w, n, m)
    return w * mask, mask


def _timer(table):
    calls = []

    def timer(kernel, key, run):
        calls.append((kernel, key))
        run()  # the layer must compute on the timing input
        return table[kernel]

    return timer, calls


def test_candidates_per_device_and_mode():
    cpu = torch.device("cpu")
    assert nm_select.candidate_kernels(cpu, "speed") == ("dense", "cpu")
    assert nm_select.candidate_kernels(cpu, "memory") == ("cpu",)
    cuda = torch.device("cuda")
    assert nm_select.candidate_kernels(cuda, "speed") == ("dense", "cusparselt", "cutlass", "triton")
    assert nm_select.candidate_kernels(cuda, "memory") == ("triton",)
    with pytest.raises(ValueError, match="mode"):
        nm_select.candidate_kernels(cpu, "fast")


@pytest.mark.parametrize("table,mode,expected", [
    ({"dense": 1.0, "cpu": 3.0}, "speed", "dense"),
    ({"dense": 3.0, "cpu": 1.0}, "speed", "cpu"),
    ({"dense": 1.0, "cpu": 3.0}, "memory", "cpu"),
])
def test_choose_kernel_picks_fastest_eligible(table, mode, expected):
    masked, mask = _masked()
    timer, calls = _timer(table)
    choice, layer = nm_select.choose_kernel(masked, None, 2, 4, mask, mode=mode, tokens=3, timer=timer)
    assert choice.kernel == expected
    assert choice.vs_dense == pytest.approx(table["dense"] / table[expected])
    assert {k for k, _ in calls} == {"dense", "cpu"}  # dense is timed even in memory mode
    key = calls[0][1]
    assert (key.out_features, key.in_features, key.nm, key.tokens, key.dtype) == (32, 64, "2:4", 3, "float32")
    if expected == "dense":
        assert layer is None
    else:
        assert isinstance(layer, PackedNMLinear) and layer.backend == "cpu"


def test_wrong_kernel_is_never_chosen(monkeypatch):
    masked, mask = _masked()
    real = PackedNMLinear.forward
    monkeypatch.setattr(PackedNMLinear, "forward", lambda self, x: real(self, x) * 1.01)
    timer, _ = _timer({"dense": 5.0, "cpu": 1.0})
    choice, layer = nm_select.choose_kernel(masked, None, 2, 4, mask, tokens=4, timer=timer)
    assert choice.kernel == "dense" and layer is None
    assert "differs" in choice.rejected["cpu"]


def test_kernel_that_raises_is_not_a_candidate(monkeypatch):
    masked, mask = _masked()

    def refuse(self, x):
        raise RuntimeError("below the library's minimum")

    monkeypatch.setattr(PackedNMLinear, "forward", refuse)
    choice, layer = nm_select.choose_kernel(masked, None, 2, 4, mask, mode="memory", tokens=4,
                                            timer=_timer({"dense": 1.0, "cpu": 0.1})[0])
    assert choice.kernel == "dense" and layer is None  # memory mode with no working packed kernel
    assert "minimum" in choice.rejected["cpu"]


def test_cache_is_written_read_and_keyed(tmp_path):
    masked, mask = _masked()
    path = tmp_path / "t.json"
    cache = nm_select.TimingCache(path)
    first, _ = nm_select.choose_kernel(masked, None, 2, 4, mask, tokens=2, cache=cache, reps=1)
    stored = json.loads(path.read_text())
    assert set(first.times_ms) == {"dense", "cpu"} and len(stored) == 2
    key = nm_select.layer_key(masked, 2, 4, 2)
    assert all(key.device in k and torch.__version__ in k and "32x64" in k and "T2" in k for k in stored)
    # a prepared file decides without measuring: make the packed path look 10x faster
    stored = {k: (0.1 if k.endswith("|cpu") else 1.0) for k in stored}
    path.write_text(json.dumps(stored))
    choice, layer = nm_select.choose_kernel(masked, None, 2, 4, mask, tokens=2,
                                            cache=nm_select.TimingCache(path))
    assert choice.kernel == "cpu" and choice.vs_dense == pytest.approx(10.0)
    # another token count is another key: measured, not read
    other, _ = nm_select.choose_kernel(masked, None, 2, 4, mask, tokens=5,
                                       cache=nm_select.TimingCache(path), reps=1)
    assert len(json.loads(path.read_text())) == 4 and other.times_ms["cpu"] != 0.1


def test_cache_dir_falls_back_when_unwritable(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("SPION_FX_CACHE_DIR", str(blocked / "sub"))
    cache = nm_select.TimingCache()
    assert cache.path.parent != blocked / "sub" and cache.path.name == nm_select.CACHE_FILE
    cache.put({"k": 1.0})
    assert nm_select.TimingCache(cache.path).get("k") == 1.0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 24)
        self.conv = Conv1D(8, 24)

    def forward(self, x):
        return self.conv(torch.relu(self.fc(x)))


def _trained_net():
    torch.manual_seed(0)
    net = Net()
    ctl = LinearSparsityController(LinearPolicy(method="srste", n=2, m=4),
                                   {"fc": ((24, 16), False), "conv": ((24, 8), True)})
    ctl.bind({"fc": net.fc.weight, "conv": net.conv.weight})
    x = torch.randn(5, 16)
    with torch.no_grad():
        h = torch.relu(ctl.site("fc")(x, net.fc.weight, net.fc.bias))
        ref = ctl.site("conv")(h, net.conv.weight, net.conv.bias)
    return net, ctl, x, ref


def test_finalize_speed_mode_with_injected_timings(capsys):
    net, ctl, x, ref = _trained_net()
    per_layer = {24 * 16: {"dense": 1.0, "cpu": 4.0}, 24 * 8: {"dense": 2.0, "cpu": 1.0}}

    def timer(kernel, key, run):
        return per_layer[key.out_features * key.in_features][kernel]

    done = finalize(net, controller=ctl, tokens=7, timer=timer)
    assert isinstance(net.fc, nn.Linear) and done["fc"].startswith("dense 2:4")  # dense was faster
    assert isinstance(net.conv, PackedNMLinear) and net.conv.backend == "cpu"
    assert not net.fc.weight[~ctl.site("fc").mask].any()  # mask baked into the kept module
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref)
    rows = {r["name"]: r for r in ctl.report()}
    assert rows["fc"]["kernel"] == "dense" and rows["fc"]["vs_dense"] == pytest.approx(1.0)
    assert rows["conv"]["kernel"] == "cpu" and rows["conv"]["vs_dense"] == pytest.approx(2.0)
    print_report([{"kind": "linear", **r} for r in ctl.report()])
    out = capsys.readouterr().out
    assert "cpu (2.00x" in out and "dense (1.00x" in out


def test_finalize_measures_on_cpu_and_stays_exact(tmp_path):
    net, ctl, x, ref = _trained_net()
    done = finalize(net, controller=ctl, tokens=4, cache=tmp_path / "c.json")
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref)
    for name in ("fc", "conv"):
        row = ctl.site(name).describe()
        assert row["kernel"] in ("dense", "cpu") and row["vs_dense"] > 0, done[name]
    assert len(json.loads((tmp_path / "c.json").read_text())) == 4  # two shapes x two kernels


def test_finalize_forced_backend_skips_measuring():
    net, ctl, x, ref = _trained_net()
    finalize(net, controller=ctl, backend="cpu", timer=lambda *a: pytest.fail("measured"))
    assert isinstance(net.fc, PackedNMLinear) and ctl.site("fc").kernel == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref)



def test_finalize_rejects_bad_mode_and_tokens():
    net, ctl, _, _ = _trained_net()
    with pytest.raises(ValueError, match="mode='fast'"):
        finalize(net, controller=ctl, mode="fast")
    with pytest.raises(ValueError, match="tokens=0"):
        finalize(net, controller=ctl, tokens=0)
