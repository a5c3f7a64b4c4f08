"""Guards of the training loop: non-finite steps and stop signals."""

import os
import signal

import pytest

from vlp.config import RunConfig, TrainConfig
from vlp.train.loop import NonFiniteLossError, TrainState, check_finite
from vlp.train.signals import StopRequest


def test_nonfinite_steps_are_counted_and_a_finite_step_resets_the_streak():
    cfg, state, saves = RunConfig(train=TrainConfig(max_nonfinite_steps=3)), TrainState(), []
    for skipped in (1, 1, 0, 1, 1):
        check_finite(cfg, state, skipped, lambda: saves.append(1))
    assert state.skipped_steps == 4 and state.nonfinite_streak == 2 and not saves


def test_too_many_nonfinite_steps_in_a_row_save_then_stop():
    cfg, state, saves = RunConfig(train=TrainConfig(max_nonfinite_steps=2)), TrainState(), []
    check_finite(cfg, state, 1, lambda: saves.append(1))
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps.*last good state"):
        check_finite(cfg, state, 1, lambda: saves.append(1))
    assert saves == [1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_is_recorded_not_fatal(signum):
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signum)
        assert stop.signum == signum
    finally:
        stop.uninstall()
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)
