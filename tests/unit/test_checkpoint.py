"""Checkpoints: complete or absent, self-describing, loadable without unpickling."""

import json

import pytest
import torch

from vlp import checkpoint


def tiny_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.98))
    model(torch.randn(5, 4)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def save(run_dir, step, model, optimizer, keep_last=2):
    return checkpoint.save_checkpoint(
        run_dir, step=step, model=model, optimizer=optimizer,
        trainer_state={"samples_seen": step * 10}, model_info={"name": "toy"},
        config_yaml="train: {steps: 3}\n", keep_last=keep_last,
    )


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, optimizer = tiny_setup(0)
    torch.manual_seed(123)
    path = save(tmp_path, 5, model, optimizer)
    expected_random = torch.rand(3)

    other_model, other_opt = tiny_setup(1)
    state = checkpoint.load_checkpoint(path, model=other_model, optimizer=other_opt)

    assert state["step"] == 5 and state["samples_seen"] == 50
    for a, b in zip(model.state_dict().values(), other_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    saved_opt, loaded_opt = optimizer.state_dict(), other_opt.state_dict()
    for pid in saved_opt["state"]:
        for name, value in saved_opt["state"][pid].items():
            torch.testing.assert_close(loaded_opt["state"][pid][name], value)
    assert loaded_opt["param_groups"][0]["lr"] == saved_opt["param_groups"][0]["lr"]
    torch.testing.assert_close(torch.rand(3), expected_random)


def test_checkpoint_is_self_describing(tmp_path):
    model, optimizer = tiny_setup()
    path = save(tmp_path, 1, model, optimizer)
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "optimizer.safetensors", "trainer_state.json",
            "rng.safetensors", "model_config.json", "config.yaml"} <= names
    assert json.loads((path / "model_config.json").read_text()) == {"name": "toy"}
    assert not list(path.glob("*.pt")) and not list(path.glob("*.bin")) and not list(path.glob("*.pkl"))


def test_names_sort_in_step_order_and_latest_points_to_newest(tmp_path):
    model, optimizer = tiny_setup()
    for step in (9, 10, 100):
        save(tmp_path, step, model, optimizer, keep_last=5)
    found = checkpoint.list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-000000009", "step-000000010", "step-000000100"]
    assert checkpoint.latest_checkpoint(tmp_path) == found[-1]


def test_only_the_newest_are_kept(tmp_path):
    model, optimizer = tiny_setup()
    for step in range(1, 6):
        save(tmp_path, step, model, optimizer, keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step-000000004", "step-000000005"]


def test_unfinished_checkpoint_is_ignored(tmp_path):
    model, optimizer = tiny_setup()
    good = save(tmp_path, 2, model, optimizer)
    (tmp_path / "step-000000003.tmp").mkdir()  # a crash mid-write leaves only this
    (tmp_path / "latest").unlink()
    assert checkpoint.latest_checkpoint(tmp_path) == good


def test_truncated_weights_give_a_clear_error(tmp_path):
    model, optimizer = tiny_setup()
    path = save(tmp_path, 1, model, optimizer)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors"):
        checkpoint.load_checkpoint(path, model=model, optimizer=optimizer)


def test_missing_state_file_is_named(tmp_path):
    model, optimizer = tiny_setup()
    path = save(tmp_path, 1, model, optimizer)
    (path / "trainer_state.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="trainer_state.json"):
        checkpoint.load_checkpoint(path, model=model, optimizer=optimizer)
