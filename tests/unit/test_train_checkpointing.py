"""When a run saves, which checkpoint it resumes from, and what a resume restores."""

import logging

import pytest
import torch

from vlp import checkpoint
from vlp.config import CheckpointConfig, ConfigError
from vlp.train.checkpointing import (
    choose_checkpoint,
    is_milestone,
    restore_run_checkpoint,
    save_due,
    save_run_checkpoint,
)


class Wrapper(torch.nn.Module):
    """Stands for `DualEncoder`: the checkpoint holds `.model`'s weights."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(3, 2)


class FakeAccelerator:
    """A single process with a real CPU grad scaler, as fp16 on one GPU would have."""

    is_main_process = True
    num_processes = 1
    process_index = 0

    def __init__(self):
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        self.printed = []

    def wait_for_everyone(self):
        pass

    def print(self, *args):
        self.printed.append(" ".join(map(str, args)))


def save_step(run_dir, cfg, step, model, optimizer, accelerator):
    save_run_checkpoint(accelerator, run_dir, cfg, step=step, model=model, optimizer=optimizer,
                        trainer_state={"samples_seen": step}, model_info={"name": "toy"},
                        config_yaml="", files={})


def trained(seed: int):
    model = Wrapper(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_milestones_come_from_the_list_and_from_milestone_every():
    cfg = CheckpointConfig(every=100, milestones=[30], milestone_every=250)
    assert [s for s in range(1, 1001) if is_milestone(cfg, s)] == [30, 250, 500, 750, 1000]
    assert [s for s in range(1, 301) if save_due(cfg, s, last=s == 300)] == [30, 100, 200, 250,
                                                                                300]


@pytest.mark.parametrize("bad", [{"milestone_every": -1}, {"milestones": [0, 10]}])
def test_impossible_milestones_are_config_errors(bad):
    with pytest.raises(ConfigError, match=f"checkpoint.{next(iter(bad))}"):
        CheckpointConfig(**bad)


def test_save_and_restore_bring_back_weights_step_and_grad_scaler(tmp_path):
    cfg = CheckpointConfig(every=1, keep_last=1, milestones=[1])
    model, optimizer = trained(0)
    saving = FakeAccelerator()
    saving.scaler.scale(torch.ones(()))  # the scale exists once a loss was scaled
    saving.scaler.update(new_scale=128.0)
    save_step(tmp_path, cfg, 1, model, optimizer, saving)
    save_step(tmp_path, cfg, 2, model, optimizer, saving)
    save_step(tmp_path, cfg, 3, model, optimizer, saving)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step-000000001", "step-000000003"]  # the milestone survives keep_last=1

    other, other_opt = trained(1)
    resuming = FakeAccelerator()
    saved = restore_run_checkpoint(resuming, tmp_path, cfg, model=other, optimizer=other_opt)

    assert saved["step"] == 3 and saved["samples_seen"] == 3
    torch.testing.assert_close(other.model.weight, model.model.weight)
    assert resuming.scaler.get_scale() == 128.0
    assert resuming.printed == [f"resumed from {tmp_path / 'step-000000003'} at step 3"]


def test_auto_resume_skips_a_broken_newest_checkpoint_with_a_warning(tmp_path, caplog):
    cfg = CheckpointConfig(every=1, keep_last=3)
    model, optimizer = trained(0)
    for step in (1, 2):
        save_step(tmp_path, cfg, step, model, optimizer, FakeAccelerator())
    weights = tmp_path / "step-000000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    with caplog.at_level(logging.WARNING):
        saved = restore_run_checkpoint(FakeAccelerator(), tmp_path, cfg, model=model,
                                       optimizer=optimizer)

    assert saved["step"] == 1
    assert "skipping checkpoint step-000000002 (moved to step-000000002.broken)" in caplog.text
    assert str(weights) in caplog.text
    assert (tmp_path / "step-000000002.broken" / "model.safetensors").is_file()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000000001"]


def test_a_broken_checkpoint_named_explicitly_is_an_error(tmp_path):
    model, optimizer = trained(0)
    save_step(tmp_path, CheckpointConfig(), 1, model, optimizer, FakeAccelerator())
    ckpt = tmp_path / "step-000000001"
    (ckpt / "optimizer.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"checkpoint.resume=.*step-000000001 does not verify"
                                          r".*optimizer.safetensors"):
        choose_checkpoint(tmp_path, str(ckpt))


def test_auto_resume_refuses_to_start_over_when_no_checkpoint_verifies(tmp_path):
    model, optimizer = trained(0)
    save_step(tmp_path, CheckpointConfig(), 1, model, optimizer, FakeAccelerator())
    (tmp_path / "step-000000001" / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="no checkpoint in .* verifies: step-000000001: .*"
                                          "manifest.json"):
        choose_checkpoint(tmp_path, "auto")
    assert (tmp_path / "step-000000001").is_dir()  # refusing to resume touches nothing


def test_an_empty_run_folder_or_resume_never_starts_from_scratch(tmp_path):
    assert choose_checkpoint(tmp_path, "auto") is None
    model, optimizer = trained(0)
    save_step(tmp_path, CheckpointConfig(), 1, model, optimizer, FakeAccelerator())
    assert choose_checkpoint(tmp_path, "never") is None
