"""Pre-emption: SIGTERM or SIGUSR1 asks the run to save a checkpoint and stop cleanly."""

from __future__ import annotations

import signal
from types import FrameType

import torch
from accelerate import Accelerator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records a stop signal; every rank agrees on it at the same step via one all-reduce."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> StopRequest:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def requested(self, accelerator: Accelerator) -> bool:
        """True on every rank if any rank has received a stop signal."""
        flag = torch.tensor(float(self.signum is not None), device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, "max")
        return bool(flag)
