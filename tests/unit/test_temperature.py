"""`loss.temperature`: a learned, fixed or scheduled softmax temperature τ = 1/exp(logit_scale)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState

from vlp.config import ConfigError, TemperatureConfig, build_typed
from vlp.temperature import SCHEDULES, temperature_at
from vlp.train.checks import load_run_config
from vlp.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "shapesworld-tiny-fixed-temp.yaml"
STEPS = 3


# ---------------------------------------------------------------- the schedules


def test_every_mode_but_learned_is_a_schedule():
    assert SCHEDULES["learned"] is None
    assert {mode for mode, schedule in SCHEDULES.items() if schedule} == {"fixed", "linear",
                                                                          "cosine"}


@pytest.mark.parametrize(("step", "expected"), [(0, 0.1), (5, 0.055), (10, 0.01), (12, 0.01)])
def test_linear_goes_from_start_at_the_first_step_to_end_at_the_last(step, expected):
    assert temperature_at("linear", step, 11, start=0.1, end=0.01) == pytest.approx(expected)


@pytest.mark.parametrize(("step", "expected"),
                         [(0, 0.1), (2, 0.01 + 0.09 * (1 + math.cos(math.pi / 4)) / 2),
                          (4, 0.055), (8, 0.01)])
def test_cosine_is_a_half_cosine_from_start_to_end(step, expected):
    assert temperature_at("cosine", step, 9, start=0.1, end=0.01) == pytest.approx(expected)


@pytest.mark.parametrize("step", [0, 3, 99])
def test_fixed_is_start_at_every_step(step):
    assert temperature_at("fixed", step, 100, start=0.02, end=0.5) == 0.02


def test_a_one_step_run_uses_start():
    assert temperature_at("cosine", 0, 1, start=0.1, end=0.01) == 0.1


def test_learned_has_no_schedule():
    with pytest.raises(ValueError, match="learned"):
        temperature_at("learned", 0, 10, start=0.1, end=0.1)


# ---------------------------------------------------------------- the config


def temperature(**raw) -> TemperatureConfig:
    return build_typed(TemperatureConfig, raw, "loss.temperature")


def test_the_default_is_learned_as_in_clip():
    assert TemperatureConfig().learned


@pytest.mark.parametrize(("raw", "message"), [
    ({"mode": "exponential", "start": 0.1}, "mode must be one of learned, fixed, linear, cosine"),
    ({"mode": "fixed"}, "start is needed with mode fixed"),
    ({"mode": "cosine", "start": 0.1}, "end is needed with mode cosine"),
    ({"mode": "learned", "start": 0.1}, "start is not used with mode learned"),
    ({"mode": "fixed", "start": 0.1, "end": 0.2}, "end is not used with mode fixed"),
    ({"mode": "fixed", "start": 0.005}, r"start must be in \[0.01, 1\]"),
    ({"mode": "linear", "start": 0.1, "end": 2}, r"end must be in \[0.01, 1\]"),
])
def test_impossible_temperatures_are_config_errors_naming_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        temperature(**raw)


def test_the_shipped_recipe_fixes_the_temperature_at_one_hundredth():
    cfg = load_run_config(RECIPE)
    assert (cfg.loss.temperature.mode, cfg.loss.temperature.start) == ("fixed", 0.01)


# ---------------------------------------------------------------- in the trainer


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shapesworld-cache")


def trainer(run_dir: Path, cache: Path, *overrides: str) -> Trainer:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    cfg = load_run_config(RECIPE, [
        f"output_dir={run_dir}", f"data.cache_dir={cache}", "data.synth.num_train=300",
        "data.synth.num_eval=32", "data.synth.samples_per_shard=150", "data.batch_size=4",
        "data.num_workers=0", "data.shuffle_buffer=50", "train.trackers=[jsonl]",
        f"train.steps={STEPS}", "optim.warmup_steps=1", "optim.lr=1e-2", *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    built = Trainer(cfg, run_dir)
    built.restore()
    return built


def scale_of(t: Trainer) -> float:
    return float(t.bundle.model.logit_scale.detach().exp())


@pytest.mark.slow
def test_a_fixed_temperature_stays_fixed_and_is_not_optimized(tmp_path, cache):
    t = trainer(tmp_path / "run", cache, "loss.temperature={mode: fixed, start: 0.05}")
    logit_scale = t.bundle.model.logit_scale
    assert not logit_scale.requires_grad
    optimized = [p for group in t.optimizer.param_groups for p in group["params"]]
    assert all(p is not logit_scale for p in optimized)
    for _ in range(2):
        metrics = t.log(t.step())
        assert metrics["logit_scale"] == pytest.approx(20.0, rel=1e-6)
        assert scale_of(t) == pytest.approx(20.0, rel=1e-6)


@pytest.mark.slow
def test_a_learned_temperature_is_optimized(tmp_path, cache):
    t = trainer(tmp_path / "run", cache, "loss.temperature={mode: learned}")
    before = scale_of(t)
    t.step()
    assert t.bundle.model.logit_scale.requires_grad
    assert scale_of(t) != pytest.approx(before, rel=1e-4)


COSINE = "loss.temperature={mode: cosine, start: 0.1, end: 0.02}"


@pytest.mark.slow
def test_the_loss_sees_and_the_log_shows_the_scheduled_scale(tmp_path, cache):
    """The metric at logged step k is 1/τ of the k-th step (0-based k − 1)."""
    t = trainer(tmp_path / "run", cache, COSINE)
    seen = []
    forward = t.objective.forward

    def recording(output, batch):
        seen.append(float(output["logit_scale"].detach()))
        return forward(output, batch)

    t.objective.forward = recording
    logged = [t.log(t.step())["logit_scale"] for _ in range(STEPS)]
    expected = [1 / t.cfg.loss.temperature.at(k, STEPS) for k in range(STEPS)]
    assert expected[0] == pytest.approx(10.0) and expected[-1] == pytest.approx(50.0)
    assert seen == pytest.approx(expected, rel=1e-6)
    assert logged == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_a_resumed_run_has_the_uninterrupted_runs_temperature_at_every_step(tmp_path, cache):
    whole = trainer(tmp_path / "whole", cache, COSINE)
    uninterrupted = []
    for _ in range(STEPS):
        whole.step()
        uninterrupted.append(scale_of(whole))

    first = trainer(tmp_path / "resumed", cache, COSINE)
    first.step()
    assert first.save()
    second = trainer(tmp_path / "resumed", cache, COSINE)
    assert second.state.step == 1
    resumed = []
    for _ in range(STEPS - 1):
        second.step()
        resumed.append(scale_of(second))
    assert resumed == pytest.approx(uninterrupted[1:], rel=1e-6)
    assert len(set(uninterrupted)) == STEPS  # the temperature did change from step to step
