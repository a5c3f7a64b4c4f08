"""Every stop saves: SIGINT (Ctrl-C), SIGTERM (pre-emption) and SIGUSR1 (SLURM's warning before
the time limit) ask the run to finish its current step, save a checkpoint and exit 128+signal.

A Ctrl-C while the run is already stopping exits at once (KeyboardInterrupt; `vlp train` turns it into one line and exit
code 130), for when saving itself is stuck. DataLoader workers ignore all three signals
(`vlp.stop_signals`), so signalling the whole process group stops only the main process's loop.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

import torch
from accelerate import Accelerator

from vlp.stop_signals import STOP_SIGNALS


class StopRequest:
    """Records a stop signal; every rank agrees on it at the same step via one all-reduce."""

    def __init__(self, *, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
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
        if signum == signal.SIGINT and self.signum is not None:  # Ctrl-C while stopping
            self.uninstall()  # a third Ctrl-C does what it did before the run
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            self._say(_announcement(signum))

    def _say(self, line: str) -> None:
        # os.write, not print: the handler may interrupt a print to the same stream. The
        # leading newline ends a progress bar's line, which would otherwise overwrite this one.
        if self.announce:
            os.write(2, ("\n" + line + "\n").encode())

    def requested(self, accelerator: Accelerator) -> bool:
        """True on every rank if any rank has received a stop signal (an all-reduce, and so a
        host sync, only when there are several processes)."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor(float(self.signum is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, "max"))


def _announcement(signum: int) -> str:
    if signum == signal.SIGINT:
        return "stopping after this step; Ctrl-C again to exit now"
    return f"{signal.Signals(signum).name}: stopping after this step"
