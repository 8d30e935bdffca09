"""spion_fx under the Hugging Face Trainer with `SpionCallback`: steps are counted per optimizer step
(gradient accumulation 2 counts 6 steps for 12 forwards), a forced switch happens at the right
step and is logged with its density, and `resume_from_checkpoint` after the switch restores the
patterns, phases and step counter, so the resumed run ends exactly like the uninterrupted one."""

from __future__ import annotations

import pytest
import torch

import spion_fx

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from spion_fx.integrations.hf import SpionCallback, add_spion_callback  # noqa: E402

SEQ, STEPS, ACCUMULATE = 64, 6, 2
POLICY = dict(inner="eager", block_size=16, probe_interval=2, quantile=0.6, filter_size=3, max_dense_steps=4)


class Recorder(transformers.TrainerCallback):
    """What spion_fx's state says at the end of every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, tuple[str, ...]]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        spion = model.spion_state
        phases = tuple(site.phase for site in spion.attention_sites())
        self.steps.append((state.global_step, int(spion.step), phases))


def _model():
    cfg = transformers.GPT2Config(
        vocab_size=128, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    return spion_fx.sparsify(model, "spion-cf", **POLICY)  # no optimizer: the Trainer builds it


def _data(n: int = 2 * ACCUMULATE * STEPS) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 128, (n, SEQ), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def _trainer(model, tmp_path, *, callback_first: bool = False, **args):
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=ACCUMULATE,
        max_steps=STEPS, learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    arguments = transformers.TrainingArguments(**{**settings, **args})
    recorder = Recorder()
    callbacks = [recorder] if callback_first else [SpionCallback(), recorder]
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=_data(), callbacks=callbacks)
    if callback_first:
        add_spion_callback(trainer)
    return trainer, recorder


def _train_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted run, checkpointed after step 5 (one step after the switch)."""
    torch._dynamo.reset()
    out = tmp_path_factory.mktemp("full")
    model = _model()
    trainer, recorder = _trainer(model, out, save_strategy="steps", save_steps=5)
    trainer.train()
    torch._dynamo.reset()
    return model, trainer, recorder, out / "checkpoint-5"


def test_trainer_counts_optimizer_steps_and_logs_the_switch(full_run):
    model, trainer, recorder, _ = full_run
    # 12 training forwards, 6 optimizer steps: spion_fx's step is the Trainer's global step
    assert [(g, s) for g, s, _ in recorder.steps] == [(g, g) for g in range(1, STEPS + 1)]
    switch = POLICY["max_dense_steps"]
    assert [phases for _, _, phases in recorder.steps] == (
        [("dense", "dense")] * (switch - 1) + [("sparse", "sparse")] * (STEPS - switch + 1))
    sites = list(model.spion_state.attention_sites())
    assert [int(s.switch_step) for s in sites] == [switch, switch]

    logs = _train_logs(trainer)
    assert [entry["spion/step"] for entry in logs] == list(range(1, STEPS + 1))
    assert [entry["spion/sparse_sites"] for entry in logs] == [0] * (switch - 1) + [2] * (STEPS - switch + 1)
    switched = [entry for entry in logs if any(k.startswith("spion/switch_step/") for k in entry)]
    assert len(switched) == 1 and switched[0]["step"] == switch, "each switch is logged once"
    report = {row["site"]: row for row in spion_fx.report(model, print_table=False) if row["kind"] == "attention"}
    for name, row in report.items():
        assert switched[0][f"spion/switch_step/{name}"] == switch
        assert switched[0][f"spion/density/{name}"] == pytest.approx(row["density"])
        assert 0 < row["density"] < 1
        if row.get("mass_kept") is not None:  # recorded at the switch where the site supports it
            assert switched[0][f"spion/mass_kept/{name}"] == pytest.approx(row["mass_kept"])
    assert logs[-1]["spion/attention_density"] == pytest.approx(sum(r["density"] for r in report.values()) / 2)


def test_resume_after_the_switch_restores_patterns_phases_and_step(full_run, tmp_path):
    model, trainer, _, checkpoint = full_run
    full_losses = [entry["loss"] for entry in _train_logs(trainer)]
    assert checkpoint.is_dir()

    resumed_model = _model()
    resumed, recorder = _trainer(resumed_model, tmp_path / "resumed", callback_first=True)
    # add_spion_callback: right after the flow callback, ahead of any report_to integration
    assert isinstance(resumed.callback_handler.callbacks[1], SpionCallback)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    # one more optimizer step after the checkpoint: the counter continues from 5, sparse already
    assert recorder.steps == [(STEPS, STEPS, ("sparse", "sparse"))]
    for want, got in zip(model.spion_state.attention_sites(), resumed_model.spion_state.attention_sites()):
        assert got.spec.name == want.spec.name and got.phase == want.phase == "sparse"
        assert int(got.switch_step) == int(want.switch_step) == POLICY["max_dense_steps"]
        assert torch.equal(got.pattern, want.pattern)
    assert _train_logs(resumed)[-1]["loss"] == pytest.approx(full_losses[-1], rel=1e-5)
    assert _train_logs(resumed)[-1]["spion/sparse_sites"] == 2


def test_callback_needs_a_sparsified_model(tmp_path):
    torch.manual_seed(0)
    plain = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4))
    trainer, _ = _trainer(plain, tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="not sparsified"):
        trainer.train()
