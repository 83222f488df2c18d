"""Run a command that ends when the process that started it ends, however that one ends (kill -9 included):
`python -m loraflow.serve.die_with_parent PARENT_PID COMMAND...`.

A fleet replica starts its vLLM in a session of its own, so that stopping it reaches vLLM's engine and workers. If
Ray kills the replica's process outright, its destructor never runs, and without this vLLM would keep its memory
and port until the fleet stops. On Linux the kernel sends the command SIGTERM when its parent ends
(PR_SET_PDEATHSIG, kept across exec); elsewhere the command just runs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, *command = sys.argv[1:]
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != int(parent):  # the parent ended before the signal was asked for
            sys.exit(f"die_with_parent: process {parent} ended before {command[0]} started")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
