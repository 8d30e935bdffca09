"""Models built on the meta device: `sparsify` first, then `to_empty` + init, trains exactly like the
same model built on CPU with the same init, through a forced dense→sparse switch. Also the FSDP2
order (meta → fully_shard → to_empty → init, with `sparsify` before or after `fully_shard`) in a
one-process gloo group, and a clear error for a forward before the model is materialized."""

from __future__ import annotations

import datetime
import warnings

import pytest
import torch
import torch.distributed as dist

import spion_fx

transformers = pytest.importorskip("transformers")

POLICY = dict(inner="eager", block_size=16, probe_interval=2, quantile=0.6, filter_size=3, max_dense_steps=4)
STEPS, SEQ = 6, 64  # steps 0..3 dense (the switch is forced at the end of step 3), 4..5 sparse
INIT_SEED = 1234


def _config():
    return transformers.GPT2Config(
        vocab_size=128, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
    )


@torch.no_grad()
def _init(model) -> None:
    """The same init for both builds, parameter by parameter from a fixed seed (HF's
    `init_weights` skips modules it already marked initialized, so it differs between them)."""
    model.tie_weights()  # to_empty gives tied parameters separate storage: tie them again
    torch.manual_seed(INIT_SEED)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.zeros_(param)
        elif ".ln_" in name:
            torch.nn.init.ones_(param)
        else:
            torch.nn.init.normal_(param, std=0.02)


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(0))


def _train(model, steps: int = STEPS) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    spion_fx.get_state(model).attach_optimizer(opt)  # the optimizer exists only after to_empty
    ids, losses = _ids(), []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _summary(model) -> dict:
    state = spion_fx.get_state(model)
    sites = {s.spec.name: (s.phase, int(s.switch_step), s.pattern.clone()) for s in state.attention_sites()}
    return {"step": int(state.step), "sites": sites}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@pytest.fixture(scope="module")
def cpu_run():
    """The reference: built on CPU, same init, sparsified, trained."""
    torch._dynamo.reset()
    model = transformers.GPT2LMHeadModel(_config()).train()
    _init(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    spion_fx.sparsify(model, "spion-cf", **POLICY)
    losses = _train(model)
    torch._dynamo.reset()
    return {"weights": weights, "losses": losses, **_summary(model)}


def _assert_same_run(model, losses, cpu_run) -> None:
    got = _summary(model)
    assert got["step"] == cpu_run["step"] == STEPS
    assert got["sites"].keys() == cpu_run["sites"].keys() and len(got["sites"]) == 2
    for name, (phase, switch_step, pattern) in cpu_run["sites"].items():
        assert phase == "sparse" and switch_step == POLICY["max_dense_steps"], name
        assert got["sites"][name][:2] == (phase, switch_step), name
        assert torch.equal(got["sites"][name][2], pattern), name
    assert losses == pytest.approx(cpu_run["losses"], rel=1e-5)


def test_meta_model_sparsified_then_materialized_trains_like_a_cpu_model(cpu_run):
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(_config())
    model.train()
    spion_fx.sparsify(model, "spion-cf", **POLICY)
    assert model.spion_state.step.is_meta
    model.to_empty(device="cpu")
    _init(model)
    state = model.spion_state
    assert state.step.device.type == "cpu" and int(state.step) == 0, "to_empty leaves garbage: reset"
    for name, weight in cpu_run["weights"].items():
        if not name.startswith("spion_state."):
            torch.testing.assert_close(model.state_dict()[name], weight, rtol=0, atol=0, msg=name)
    _assert_same_run(model, _train(model), cpu_run)


def test_forward_before_materializing_says_what_to_do():
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(_config())
    spion_fx.sparsify(model, "spion-cf", **POLICY)
    with pytest.raises(RuntimeError, match=r"meta device.*to_empty"):
        model(input_ids=torch.zeros(1, SEQ, dtype=torch.long, device="meta"))


@pytest.fixture
def gloo_world_of_one():
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    import _dist_worker

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_dist_worker.free_port()}", rank=0, world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("order", ["sparsify_then_shard", "shard_then_sparsify"])
def test_fsdp2_meta_init_trains_like_a_cpu_model(order, cpu_run, gloo_world_of_one):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(_config())
    model.train()
    mesh = init_device_mesh("cpu", (1,))

    def shard() -> None:
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)

    if order == "sparsify_then_shard":
        spion_fx.sparsify(model, "spion-cf", **POLICY)
        shard()
    else:
        shard()
        spion_fx.sparsify(model, "spion-cf", **POLICY)
    model.to_empty(device="cpu")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "DTensor random operators")  # CPU mesh: plain RNG
        _init(model)
    for name, weight in cpu_run["weights"].items():
        if not name.startswith("spion_state."):
            torch.testing.assert_close(_full(model.state_dict()[name]), weight, rtol=0, atol=0, msg=name)
    _assert_same_run(model, _train(model), cpu_run)
