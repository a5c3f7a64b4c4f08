"""One run per output folder: the run lock."""

import os
import socket
import time

import pytest

from vlp.config import ConfigError
from vlp.train.run_lock import LOCK_FILE, RunFolderInUseError, RunLock


def test_a_second_run_on_a_locked_folder_is_refused_naming_pid_and_host(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunFolderInUseError) as refused:
            RunLock(tmp_path / "run").acquire()
    message = str(refused.value)
    assert isinstance(refused.value, ConfigError) and "\n" not in message
    assert message.startswith(f"output_dir {tmp_path / 'run'} is in use by pid {os.getpid()} "
                              f"on host {socket.gethostname()} (lock file "
                              f"{tmp_path / 'run' / LOCK_FILE})")


def test_the_lock_is_released_when_the_run_ends(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}@{socket.gethostname()}\n"
    with RunLock(tmp_path):
        pass
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_a_lock_file_left_by_a_dead_run_does_not_block(tmp_path):
    (tmp_path / LOCK_FILE).write_text("999999@elsewhere\n")  # nobody holds the lock
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"{os.getpid()}@")


def test_a_killed_run_frees_the_folder_even_while_its_forked_workers_live(tmp_path):
    lock = RunLock(tmp_path).acquire()
    started, ready = os.pipe()
    child = os.fork()
    if child == 0:  # a DataLoader worker, say: outlives its parent for a moment
        os.write(ready, b"1")  # it runs: the fork hooks are done
        time.sleep(3)
        os._exit(0)
    try:
        assert os.read(started, 1) == b"1"
        os.close(lock.fd)  # what the parent's death does, without unlocking first
        lock.fd = None
        with RunLock(tmp_path):
            pass
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
        os.close(started)
        os.close(ready)


def test_only_the_main_rank_takes_the_lock(tmp_path, monkeypatch):
    with RunLock(tmp_path):
        monkeypatch.setenv("RANK", "1")
        with RunLock(tmp_path) as other_rank:  # shares the main rank's folder
            assert other_rank.fd is None
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(RunFolderInUseError):
            RunLock(tmp_path).acquire()
