"""The signals that ask a training run to stop after its current step, and how helper
processes stay out of the way.

A terminal's Ctrl-C reaches the whole foreground process group, and `kill -- -PGID`, SLURM
and `pkill -f` reach every process whose command line matches, DataLoader workers included
(a forked worker has its parent's command line). A worker killed by one of these signals makes
the main process fail ("DataLoader worker ... is killed by signal") before it can save, so
workers ignore them: the main process alone decides when to stop, and shuts its workers down.
The trainer's own handling is in `vlp.train.signals`.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """Ignore the stop signals in this process; a DataLoader `worker_init_fn`."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
