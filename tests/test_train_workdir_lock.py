"""One training run per workdir (train/workdir_lock.py and its use in train/loop.py)."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from ddetr_jax.train import loop
from ddetr_jax.train.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock
from tests.train_fixtures import load_config

HOLD = ("import sys, time; from ddetr_jax.train.workdir_lock import WorkdirLock; "
        "WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)")


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path's lock."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "locked\n"
    yield process
    process.kill()
    process.wait()


def test_second_run_is_refused_naming_the_holder(tmp_path, holder):
    with pytest.raises(WorkdirBusy, match=rf"{tmp_path} is in use by train.py \(pid "
                                          rf"{holder.pid} on host {socket.gethostname()}, "
                                          r"started .*use another --workdir"):
        WorkdirLock(tmp_path).acquire()


def test_lock_of_a_killed_run_does_not_block(tmp_path, holder):
    """SIGKILL leaves the file naming a dead pid; the lock is free."""
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    with WorkdirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: names no holder
    WorkdirLock(tmp_path).acquire()


@pytest.mark.parametrize("recorded, busy", [
    ({}, False),
    ({"host": socket.gethostname(), "pid": "dead"}, False),
    ({"host": socket.gethostname(), "pid": os.getppid()}, True),  # alive on this host
    ({"host": "elsewhere", "pid": 1}, True),  # cannot tell: refused
])
def test_filesystem_without_flock(tmp_path, monkeypatch, recorded, busy):
    """Without flock the file is the lock: a holder not alive on this host is replaced."""
    if recorded.get("pid") == "dead":
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
        recorded = {**recorded, "pid": int(dead.stdout)}
    (tmp_path / LOCK_FILE).write_text(json.dumps(recorded))

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("fcntl.flock", no_flock)
    if busy:
        with pytest.raises(WorkdirBusy, match=f"pid {recorded['pid']} on host"):
            WorkdirLock(tmp_path).acquire()
    else:
        with WorkdirLock(tmp_path):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_train_refuses_a_busy_workdir_before_anything(tmp_path, holder):
    config = load_config("configs/quickstart.py")
    with pytest.raises(WorkdirBusy, match=f"pid {holder.pid}"):
        loop.train(config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # no config.json


def test_train_releases_the_lock_when_it_fails(tmp_path):
    config = load_config("configs/r50_deformable_detr.py")
    config.data.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not found"):
        loop.train(config, tmp_path / "run")
    WorkdirLock(tmp_path / "run").acquire()
