"""Stopping the main job's ranks cleanly: Ctrl-C, SIGTERM, or the launcher's death.

Note: the first Ctrl-C / SIGTERM asks for a stop; every rank learns of it at the next step
through a one-float allreduce on a gloo group of its own, started after each step and read
one step later, so it costs no wait and no device sync; the ranks then all checkpoint and
report. A terminal's Ctrl-C reaches each rank and the launcher, which may pass it on again:
repeats within `grace_s` count as one request. A later one aborts at once.

A rank also stops like this when its launcher dies (SIGTERM from the kernel's parent-death
signal, or its own watchdog on the launcher's pid), and exits for good if it has not stopped
`deadline_s` later, so no rank outlives its launcher for long. The launcher is our own
(launch.py, its pid in the environment) or, under the user's torchrun, torchrun's agent (the
rank's parent when it starts): the same watch serves both.
"""
import ctypes
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist


class StopFlag:
    grace_s = 5.0
    deadline_s = 120.0

    def __init__(self):
        self.requested = False
        self.why = ""
        self._first = None
        self._group = None
        self._buf = torch.zeros(1)
        self._work = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        now = time.monotonic()
        if self.requested and now - self._first > self.grace_s:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self._first = True, now
            self.why = signal.Signals(signum).name

    def request(self, why):
        if not self.requested:
            self.requested, self._first, self.why = True, time.monotonic(), why

    def poll(self) -> bool:
        """Called once per step on every rank: True everywhere, one step after any rank was
        asked to stop."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        agreed = False
        if self._work is not None:
            self._work.wait()
            agreed = float(self._buf[0]) > 0
        self._buf.fill_(1.0 if self.requested else 0.0)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return agreed

    def finish(self):
        """Waits for the last agreement in flight (every rank makes the same number of them)."""
        if self._work is not None:
            self._work.wait()
            self._work = None


def die_with_parent(parent_pid: int, stop: StopFlag):
    """The launcher's death stops this rank (see the module's Note)."""
    if sys.platform.startswith("linux"):
        try:
            PR_SET_PDEATHSIG = 1
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        stop.request("the launcher died")
        time.sleep(StopFlag.deadline_s)
        os._exit(1)

    threading.Thread(target=watch, name="pyengine-parent-watch", daemon=True).start()
