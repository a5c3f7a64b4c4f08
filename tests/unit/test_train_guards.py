"""Guards of the training loop: non-finite steps and weights, and stop signals."""

import os
import signal
from types import SimpleNamespace

import pytest
import torch

from vlp.checkpoint import checkpoint_name
from vlp.config import RunConfig, TrainConfig
from vlp.stop_signals import STOP_SIGNALS, ignore_stop_signals
from vlp.train.loop import TrainState
from vlp.train.nonfinite import NonFiniteLossError, check_finite, finite_to_save
from vlp.train.signals import StopRequest


def test_nonfinite_steps_are_counted_and_a_finite_step_resets_the_streak():
    cfg, state = RunConfig(train=TrainConfig(max_nonfinite_steps=3)), TrainState()
    for skipped in (1, 1, 0, 1, 1):
        check_finite(cfg, state, skipped)
    assert state.skipped_steps == 4 and state.nonfinite_streak == 2


def test_too_many_nonfinite_steps_in_a_row_stop_and_name_the_last_good_checkpoint(tmp_path):
    (tmp_path / checkpoint_name(4)).mkdir()
    (tmp_path / "latest").write_text(checkpoint_name(4) + "\n")
    cfg = RunConfig(output_dir=str(tmp_path), train=TrainConfig(max_nonfinite_steps=2))
    state = TrainState(step=6)
    check_finite(cfg, state, 1)
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive steps.*nothing saved from them, "
                       r"the last good checkpoint is .*step-000000004"):
        check_finite(cfg, state, 1)


def test_the_nonfinite_stop_says_so_when_there_is_no_checkpoint_yet(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path), train=TrainConfig(max_nonfinite_steps=1))
    with pytest.raises(NonFiniteLossError, match="no checkpoint was saved"):
        check_finite(cfg, TrainState(step=1), 1)


class WithNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.norm = torch.nn.BatchNorm1d(3)


@pytest.mark.parametrize("poison", ["weight", "buffer"])
def test_weights_or_buffers_that_are_not_finite_are_never_saved(tmp_path, poison, capsys):
    model = WithNorm()
    accelerator = SimpleNamespace(device="cpu", num_processes=1, print=print)
    assert finite_to_save(accelerator, model, step=3, run_dir=tmp_path)
    with torch.no_grad():
        (model.linear.weight if poison == "weight" else model.norm.running_var)[1] = float("nan")
    assert not finite_to_save(accelerator, model, step=3, run_dir=tmp_path)
    assert "not saving the checkpoint of step 3: the weights are not finite" in capsys.readouterr().out


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
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        assert capfd.readouterr().err == "stopping after this step; Ctrl-C again to exit now\n"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
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
