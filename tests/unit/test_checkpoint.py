"""Checkpoints: complete or absent, self-describing, loadable without unpickling."""

import json
import os
import random
import stat

import numpy as np
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


def save(run_dir, step, model, optimizer, keep_last=2, milestone=False, staged=False):
    return checkpoint.save_checkpoint(
        run_dir, step=step, model=model, optimizer=optimizer,
        trainer_state={"samples_seen": step * 10}, model_info={"name": "toy"},
        config_yaml="train: {steps: 3}\n", keep_last=keep_last, milestone=milestone,
        staged=staged,
    )


def draws():
    """One draw from each generator a training step may use."""
    return random.random(), float(np.random.randn()), torch.rand(1).item()


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    model, optimizer = tiny_setup(0)
    seed_all(123)
    np.random.randn()  # leaves a cached gaussian in numpy's state, which must survive too
    path = save(tmp_path, 5, model, optimizer)
    expected = draws()

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
    assert draws() == expected


def test_checkpoint_is_self_describing(tmp_path):
    model, optimizer = tiny_setup()
    path = save(tmp_path, 1, model, optimizer)
    names = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "optimizer.safetensors", "trainer_state.json",
            "rng.rank0.safetensors", "model_config.json", "config.yaml", "manifest.json"} <= names
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert manifest["step"] == 1 and manifest["milestone"] is False
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


def test_milestones_are_never_pruned(tmp_path):
    model, optimizer = tiny_setup()
    for step in range(1, 8):
        save(tmp_path, step, model, optimizer, keep_last=2, milestone=step in (2, 4))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step-000000002", "step-000000004", "step-000000006", "step-000000007"]


def test_each_rank_restores_its_own_rng_states(tmp_path):
    model, optimizer = tiny_setup()
    staging = checkpoint.start_checkpoint(tmp_path, 3)
    expected = {}
    for rank in (0, 1):  # as two processes would, each with its own streams
        seed_all(100 + rank)
        checkpoint.save_rng_state(staging, rank=rank)
        expected[rank] = draws()
    path = save(tmp_path, 3, model, optimizer, staged=True)
    assert {"rng.rank0.safetensors", "rng.rank1.safetensors"} <= {p.name for p in path.iterdir()}

    for rank in (1, 0):
        seed_all(7)
        state = checkpoint.load_checkpoint(path, model=model, optimizer=optimizer, rank=rank)
        assert state["rng_restored"] and draws() == expected[rank]


def test_a_rank_the_checkpoint_did_not_have_keeps_its_seeded_rng(tmp_path):
    model, optimizer = tiny_setup()
    path = save(tmp_path, 1, model, optimizer)
    seed_all(5)
    expected = draws()
    seed_all(5)
    state = checkpoint.load_checkpoint(path, model=model, optimizer=optimizer, rank=3)
    assert state["rng_restored"] is False and draws() == expected


def truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


def flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, different content: only the hash can tell
    path.write_bytes(bytes(data))


def list_outside_file(manifest_path):
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["../../outside.txt"] = {"bytes": 1, "sha256": "0" * 64}
    manifest_path.write_text(json.dumps(manifest))


DAMAGE = {
    "truncated weights": ("model.safetensors", truncate),
    "tampered weights": ("model.safetensors", flip_one_byte),
    "tampered optimizer": ("optimizer.safetensors", flip_one_byte),
    "missing rng file": ("rng.rank0.safetensors", lambda p: p.unlink()),
    "bad trainer state json": ("trainer_state.json", lambda p: p.write_text("{not json")),
    "missing manifest": ("manifest.json", lambda p: p.unlink()),
    "bad manifest json": ("manifest.json", lambda p: p.write_text("[1, 2")),
    "manifest naming a file outside": ("manifest.json", list_outside_file),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_fails_to_verify_naming_the_file(tmp_path, damage):
    model, optimizer = tiny_setup()
    path = save(tmp_path, 1, model, optimizer)
    name, damage_file = DAMAGE[damage]
    damage_file(path / name)
    with pytest.raises(checkpoint.CheckpointError, match=name.replace(".", r"\.")):
        checkpoint.verify_checkpoint(path)


def test_a_bad_checkpoint_changes_nothing_when_loading_fails(tmp_path):
    model, optimizer = tiny_setup(0)
    path = save(tmp_path, 1, model, optimizer)
    flip_one_byte(path / "optimizer.safetensors")
    other_model, other_opt = tiny_setup(1)
    before = {k: v.clone() for k, v in other_model.state_dict().items()}
    with pytest.raises(checkpoint.CheckpointError, match="optimizer.safetensors"):
        checkpoint.load_checkpoint(path, model=other_model, optimizer=other_opt)
    for key, value in other_model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_newest_verified_checkpoint_passes_over_broken_ones(tmp_path):
    model, optimizer = tiny_setup()
    for step in (1, 2, 3):
        save(tmp_path, step, model, optimizer, keep_last=3)
    truncate(tmp_path / "step-000000003" / "model.safetensors")
    (tmp_path / "step-000000002" / "trainer_state.json").unlink()

    found, skipped = checkpoint.newest_verified_checkpoint(tmp_path)

    assert found == tmp_path / "step-000000001"
    assert [(bad.name, type(err)) for bad, err in skipped] == [
        ("step-000000003", checkpoint.CheckpointError),
        ("step-000000002", checkpoint.CheckpointError)]
    assert "model.safetensors" in str(skipped[0][1])
    assert "trainer_state.json" in str(skipped[1][1])


def test_a_set_aside_checkpoint_is_no_longer_listed(tmp_path):
    model, optimizer = tiny_setup()
    bad = save(tmp_path, 1, model, optimizer)
    moved = checkpoint.set_aside(bad)
    assert moved.name == "step-000000001.broken" and moved.is_dir()
    assert checkpoint.list_checkpoints(tmp_path) == []
    bad = save(tmp_path, 1, model, optimizer)
    assert checkpoint.set_aside(bad).name == "step-000000001.broken2"


def test_after_resuming_from_an_earlier_step_the_new_timeline_wins(tmp_path):
    model, optimizer = tiny_setup()
    for step in (2, 4, 6):
        save(tmp_path, step, model, optimizer, keep_last=3)
    save(tmp_path, 3, model, optimizer, keep_last=1)  # resumed from 2, saved at 3

    # Pruning never removes what was just written, nor the abandoned steps 4 and 6;
    # resuming follows `latest` (step 3), not the highest step number.
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step-000000003", "step-000000004", "step-000000006"]
    assert checkpoint.resume_candidates(tmp_path) == [tmp_path / "step-000000003"]


def rewrite_manifest(edit):
    def damage(path):
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return damage


def entry(name, value):
    def edit(manifest):
        manifest["files"]["model.safetensors"] = value
        return manifest
    return name, edit


MALFORMED_MANIFESTS = dict([
    ("a list", lambda m: [m]),
    ("a string", lambda m: "files"),
    ("files as a list", lambda m: {**m, "files": list(m["files"])}),
    ("no files table", lambda m: {k: v for k, v in m.items() if k != "files"}),
    entry("a string entry", "0" * 64),
    entry("an entry without sha256", {"bytes": 10}),
    entry("an entry without bytes", {"sha256": "0" * 64}),
    entry("bytes as a string", {"bytes": "10", "sha256": "0" * 64}),
    entry("bytes as a bool", {"bytes": True, "sha256": "0" * 64}),
    entry("sha256 as a number", {"bytes": 10, "sha256": 0}),
])


@pytest.mark.parametrize("malformed", sorted(MALFORMED_MANIFESTS))
def test_a_malformed_manifest_is_a_broken_checkpoint_not_a_traceback(tmp_path, malformed):
    model, optimizer = tiny_setup()
    path = save(tmp_path, 1, model, optimizer)
    rewrite_manifest(MALFORMED_MANIFESTS[malformed])(path / "manifest.json")
    for model_only in (False, True):
        with pytest.raises(checkpoint.CheckpointError, match=r"manifest\.json: malformed"):
            checkpoint.verify_checkpoint(path, model_only=model_only)
    found, skipped = checkpoint.newest_verified_checkpoint(tmp_path)
    assert found is None and [bad for bad, _ in skipped] == [path]


def test_model_only_verification_refuses_a_file_the_manifest_does_not_list(tmp_path):
    model, optimizer = tiny_setup()
    path = save(tmp_path, 1, model, optimizer)
    (path / "text_tower").mkdir()
    (path / "text_tower" / "tokenizer.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match=r"tokenizer\.json: not listed in"):
        checkpoint.verify_checkpoint(path, model_only=True)


@pytest.mark.parametrize("pointer", ["../elsewhere/step-000000001", "/tmp/step-000000001",
                                     "step-000000001/../../elsewhere", "..", ""])
def test_latest_cannot_point_outside_its_run_folder(tmp_path, pointer):
    model, optimizer = tiny_setup()
    elsewhere = save(tmp_path / "elsewhere", 1, model, optimizer)
    run = tmp_path / "run"
    save(run, 1, model, optimizer)
    (run / "latest").write_text(pointer + "\n")
    with pytest.raises(checkpoint.CheckpointError, match=r"run/latest: names .* not a step-N"):
        checkpoint.latest_checkpoint(run)
    with pytest.raises(checkpoint.CheckpointError, match=r"run/latest"):
        checkpoint.resolve_checkpoint(run)
    assert elsewhere.is_dir()


def test_a_checkpoint_linked_from_elsewhere_is_not_one_of_the_run(tmp_path):
    model, optimizer = tiny_setup()
    elsewhere = save(tmp_path / "elsewhere", 5, model, optimizer)
    run = tmp_path / "run"
    own = save(run, 1, model, optimizer)
    (run / "step-000000005").symlink_to(elsewhere, target_is_directory=True)
    (run / "latest").write_text("step-000000005\n")
    assert checkpoint.list_checkpoints(run) == [own]
    assert checkpoint.latest_checkpoint(run) == own


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoint_files_get_the_mode_the_umask_gives_new_files(tmp_path, umask):
    model, optimizer = tiny_setup()
    previous = os.umask(umask)
    try:
        path = save(tmp_path, 1, model, optimizer)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir() if p.is_file()}
    assert {"model.safetensors", "optimizer.safetensors", "rng.rank0.safetensors"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes
