"""The launcher's process handling, on real processes: what it starts, it stops."""

import os
import sys
import time
from pathlib import Path

import pytest

from fedcycle_tools.launcher import ProcessGroup

# starts real processes to see that the launcher stops them
pytestmark = pytest.mark.e2e


# A leader that starts a child in a session of its own, as a simulation SuperLink starts its
# SuperExec (and that one the simulation and Ray), then both wait to be stopped.
LEADER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def test_stopping_a_process_stops_the_sessions_its_descendants_started(tmp_path):
    processes = ProcessGroup(tmp_path / "logs")
    pid_file = tmp_path / "child.pid"
    processes.start("leader", [sys.executable, "-c", LEADER, str(pid_file)], dict(os.environ), tmp_path)
    processes.wait_until("leader", lambda: pid_file.exists() and pid_file.read_text() != "", 60, "starting its child")
    child = int(pid_file.read_text())
    assert os.getpgid(child) == child != processes.pids()[0]  # its own session, not the leader's
    processes.stop("leader", grace=10)
    deadline = time.monotonic() + 10  # SIGKILL has been sent by now; the kernel may take a moment
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(child)
