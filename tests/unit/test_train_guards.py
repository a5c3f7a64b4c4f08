"""Guards of the training loop: non-finite steps and weights, and stop signals."""

import os
import signal
from types import SimpleNamespace

import pytest
import torch

from vlp.checkpoint import checkpoint_name, latest_checkpoint, list_checkpoints
from vlp.config import RunConfig, TrainConfig
from vlp.stop_signals import STOP_SIGNALS, ignore_stop_signals
from vlp.train.loop import TrainState
from vlp.train.nonfinite import NonFiniteLossError, check_finite, good_to_save
from vlp.train.signals import StopRequest


def test_nonfinite_steps_are_counted_and_a_finite_step_resets_the_streak():
    cfg, state = RunConfig(train=TrainConfig(max_nonfinite_steps=3)), TrainState()
    for skipped in (1, 1, 0, 1, 1):
        check_finite(cfg, state, skipped)
    assert state.skipped_steps == 4 and state.nonfinite_streak == 2


def checkpoints(run_dir, *steps):
    for step in steps:
        (run_dir / checkpoint_name(step)).mkdir()
    (run_dir / "latest").write_text(checkpoint_name(steps[-1]) + "\n")


def test_too_many_nonfinite_steps_in_a_row_stop_and_fall_back_to_the_last_good_checkpoint(
        tmp_path):
    checkpoints(tmp_path, 2, 4, 5)  # step 5's weights gave the non-finite loss of step 6
    cfg = RunConfig(output_dir=str(tmp_path), train=TrainConfig(max_nonfinite_steps=2))
    state = TrainState(step=6)
    check_finite(cfg, state, 1)
    state.step = 7
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive steps .*\(steps 6-7\); nothing "
                       r"saved from them, the last good checkpoint is .*step-000000004 \(step-000000005"
                       r"\.nonfinite: its weights gave step 6\)\."):
        check_finite(cfg, state, 1)
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(4)
    assert (tmp_path / "latest").read_text() == checkpoint_name(4) + "\n"
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(2), checkpoint_name(4)]
    assert (tmp_path / (checkpoint_name(5) + ".nonfinite")).is_dir()


def test_a_second_fall_back_keeps_the_first_set_aside_checkpoint(tmp_path):
    checkpoints(tmp_path, 4, 5)
    (tmp_path / (checkpoint_name(5) + ".nonfinite")).mkdir()  # an earlier divergence
    cfg = RunConfig(output_dir=str(tmp_path), train=TrainConfig(max_nonfinite_steps=1))
    with pytest.raises(NonFiniteLossError, match=r"step-000000005\.nonfinite2: its weights"):
        check_finite(cfg, TrainState(step=6), 1)
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(4)


def test_the_nonfinite_stop_says_so_when_no_good_checkpoint_is_left(tmp_path):
    checkpoints(tmp_path, 3)
    cfg = RunConfig(output_dir=str(tmp_path), train=TrainConfig(max_nonfinite_steps=1))
    with pytest.raises(NonFiniteLossError, match=r"\(step 4\); .*no good checkpoint is left"):
        check_finite(cfg, TrainState(step=4), 1)
    assert latest_checkpoint(tmp_path) is None and not (tmp_path / "latest").exists()


ONE_CPU = SimpleNamespace(device="cpu", num_processes=1, print=print)  # an Accelerator's part


class WithNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.norm = torch.nn.BatchNorm1d(3)


@pytest.mark.parametrize("poison", ["weight", "buffer"])
def test_weights_or_buffers_that_are_not_finite_are_never_saved(tmp_path, poison, capsys):
    model = WithNorm()
    assert good_to_save(ONE_CPU, model, TrainState(step=3), run_dir=tmp_path)
    with torch.no_grad():
        (model.linear.weight if poison == "weight" else model.norm.running_var)[1] = float("nan")
    assert not good_to_save(ONE_CPU, model, TrainState(step=3), run_dir=tmp_path)
    assert capsys.readouterr().out == ("not saving the checkpoint of step 3: the weights are not "
                                       "finite; latest stays unset (no checkpoint yet)\n")


def test_nothing_is_saved_while_nonfinite_steps_are_in_a_row(tmp_path, capsys):
    checkpoints(tmp_path, 4)
    assert not good_to_save(ONE_CPU, WithNorm(), TrainState(step=6, nonfinite_streak=1),
                            run_dir=tmp_path)
    assert capsys.readouterr().out == ("not saving the checkpoint of step 6: the last step was not "
                                       "finite; latest stays step-000000004\n")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_is_recorded_not_fatal(signum, capfd):
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signum)
        os.kill(os.getpid(), signum)  # a repeat changes nothing
        assert stop.signum == signum
    finally:
        stop.uninstall()
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)
    assert capfd.readouterr().err.count("stopping after this step") == 1


def test_the_first_ctrl_c_asks_to_stop_and_a_second_one_exits_at_once(capfd):
    # what SIGINT did before the run: Python's default, or SIG_IGN under `nohup ... &`
    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        assert capfd.readouterr().err == "\nstopping after this step; Ctrl-C again to exit now\n"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is before  # a third Ctrl-C does what it did
    finally:
        stop.uninstall()


def test_a_ctrl_c_after_another_stop_signal_exits_at_once():
    stop = StopRequest(announce=False).install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.uninstall()


def test_data_loader_workers_ignore_the_stop_signals():
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        ignore_stop_signals(0)
        assert set(STOP_SIGNALS) == {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}
        for signum in STOP_SIGNALS:
            os.kill(os.getpid(), signum)  # would end (or interrupt) this process otherwise
            assert signal.getsignal(signum) is signal.SIG_IGN
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_mask_buffer_of_minus_infinity_that_is_not_saved_does_not_count(tmp_path):
    model = WithNorm()
    model.register_buffer("attn_mask", torch.full((2, 2), float("-inf")), persistent=False)
    assert good_to_save(ONE_CPU, model, TrainState(step=1), run_dir=tmp_path)
