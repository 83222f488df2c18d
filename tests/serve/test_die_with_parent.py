"""`loraflow.serve.die_with_parent`: the command it runs ends when its parent is killed -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import process_running

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")

# A parent that starts `sleep` under the guard, prints its pid, and waits to be killed.
PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-m", "loraflow.serve.die_with_parent", str(os.getpid()), "sleep", "300"])
print(child.pid, flush=True)
time.sleep(300)
"""


def test_the_command_ends_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}/cmdline").read_text().split("\0")[0] != "sleep":  # the guard exec'd the command
        assert time.monotonic() < deadline, "the guard never started the command"
        time.sleep(0.05)  # the interval between two looks at /proc
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    while process_running(child):
        assert time.monotonic() < deadline, f"process {child} outlived its parent"
        time.sleep(0.05)


def test_a_parent_already_gone_stops_the_command_before_it_starts():
    result = subprocess.run(
        [sys.executable, "-m", "loraflow.serve.die_with_parent", "1", "echo", "ran"], capture_output=True, text=True
    )
    assert result.returncode == 1 and "ran" not in result.stdout and "ended before echo started" in result.stderr
