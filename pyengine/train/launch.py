"""Starts the main job's ranks on this machine, watches them, and reports how they ended.

Note: this is a small launcher of our own rather than torch.distributed.run, because the job
needs what that one does not give: ranks that cannot outlive it, a first Ctrl-C that lets
every rank finish its step and checkpoint (torchrun kills them 30 s after it), one short
report per failure instead of every rank's traceback, and exit codes that tell an interrupt
(130) from a failure (1). It sets the environment torchrun would (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); several nodes still go through the user's own torchrun.

How the ranks are tied to it:
  - they start with the current folder off sys.path, so a source checkout in the working
    directory cannot hide the installed package;
  - each asks the kernel for SIGTERM when the launcher dies (prctl PDEATHSIG) and also
    watches the launcher's pid, then stops like on Ctrl-C: checkpoint at the next step, exit;
  - they inherit the run folder's lock, which so stays held until the last of them exits.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ENV_ARGS = "PYENGINE_TRAIN_LAUNCH"  # the resolved arguments, as a JSON file
ENV_PARENT = "PYENGINE_TRAIN_PARENT"  # the launcher's pid
ENV_ERROR = "PYENGINE_TRAIN_ERROR_FILE"  # where a failing rank writes its error
ENV_LOCK_FD = "PYENGINE_TRAIN_LOCK_FD"  # the inherited descriptor of the run folder's lock

# Run in each rank with `python -c`: drop the working directory from sys.path before any import.
BOOTSTRAP = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
             "from pyengine.train.rank import main; sys.exit(main())")

KILL_GRACE_S = 10.0  # after a failure, how long the other ranks get to stop before SIGKILL


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    def __init__(self, args, out: Path, lock_fd: int):
        self.args, self.out, self.lock_fd = args, out, lock_fd
        self.procs = []
        self.interrupts = 0
        self.first_interrupt = None
        self.aborted = False  # a second Ctrl-C: the ranks were killed on purpose

    def _on_signal(self, signum, frame):
        self.interrupts += 1
        now = time.monotonic()
        if self.interrupts == 1:
            self.first_interrupt = now
            # a terminal's Ctrl-C reaches the ranks too; a signal sent to the launcher alone is
            # passed on, so every rank stops at its next step
            for p in self.procs:
                if p.poll() is None:
                    try:
                        p.send_signal(signal.SIGINT)
                    except ProcessLookupError:
                        pass
        elif now - self.first_interrupt > 5.0:  # the ranks count repeats within 5 s as one
            self.aborted = True
            for p in self.procs:
                if p.poll() is None:
                    p.kill()

    def run(self) -> int:
        n = self.args.nproc
        launch_file = self.out / ".launch.json"
        launch_file.write_text(json.dumps(vars(self.args)))
        port = free_port()
        fixed = getattr(self.args, "threads", None)  # --threads (under --deterministic on the CPU: always set)
        threads = fixed or max(1, (os.cpu_count() or 1) // n)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for r in range(n):
                env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n),
                           GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           **{ENV_ARGS: str(launch_file.resolve()), ENV_PARENT: str(os.getpid()),
                              ENV_ERROR: str(self._error_file(r)), ENV_LOCK_FD: str(self.lock_fd)})
                if fixed:
                    env["OMP_NUM_THREADS"] = str(threads)
                else:
                    env.setdefault("OMP_NUM_THREADS", str(threads))
                self._error_file(r).unlink(missing_ok=True)
                self.procs.append(subprocess.Popen([sys.executable, "-c", BOOTSTRAP], env=env,
                                                   pass_fds=(self.lock_fd,)))
            codes = self._wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            for p in self.procs:  # nothing outlives the launcher
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return self._report(codes)

    def _error_file(self, rank) -> Path:
        return self.out / f".rank{rank}.error.json"

    def _wait(self):
        """Exit codes by rank, in the order the ranks ended; after the first failure the others
        get KILL_GRACE_S to stop (they are likely blocked on the dead rank), then SIGKILL."""
        ended, failed_at = {}, None
        while len(ended) < len(self.procs):
            for r, p in enumerate(self.procs):
                if r not in ended and p.poll() is not None:
                    ended[r] = p.returncode
                    if failed_at is None and not self._clean(p.returncode):
                        failed_at = time.monotonic()
                        for q in self.procs:
                            if q.poll() is None:
                                q.terminate()
            if failed_at is not None and time.monotonic() - failed_at > KILL_GRACE_S:
                for q in self.procs:
                    if q.poll() is None:
                        q.kill()
            time.sleep(0.05)
        return ended

    def _clean(self, code) -> bool:
        stopped = (130, -signal.SIGINT, -signal.SIGTERM) + ((-signal.SIGKILL,) if self.aborted else ())
        return code == 0 or (self.interrupts > 0 and code in stopped)

    def _report(self, codes) -> int:
        failures = [(r, c) for r, c in codes.items() if not self._clean(c)]
        # the cause first: a rank that failed because a peer died (a failed collective) is a
        # consequence, even when the launcher noticed it first
        failures.sort(key=lambda rc: self._secondary(*rc))
        if failures:
            rank, code = failures[0]
            print(f"pyengine-train: rank {rank} failed: {self._cause(rank, code)}", file=sys.stderr)
            others = [r for r, c in failures[1:]]
            if others:
                print(f"pyengine-train: rank(s) {others} stopped after it", file=sys.stderr)
            print(f"pyengine-train: outputs so far are in {self.out}{self._resume_hint()}", file=sys.stderr)
            return 1
        if self.interrupts or any(c == 130 for c in codes.values()):
            print(f"pyengine-train: interrupted; outputs are in {self.out}{self._resume_hint()}", file=sys.stderr)
            return 130
        return 0

    def _secondary(self, rank, code) -> bool:
        err = self._error(rank)
        return bool(err) and (err.get("type") in ("CommError", "DistBackendError") or "peer" in err.get("message", ""))

    def _error(self, rank) -> dict:
        try:
            return json.loads(self._error_file(rank).read_text())
        except (OSError, ValueError):
            return {}

    def _cause(self, rank, code) -> str:
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (the out-of-memory killer?)" if -code == signal.SIGKILL else ""
            return f"killed by {name}{hint}"
        err = self._error(rank)
        if err:
            tail = "".join(err.get("traceback", [])[-6:]).rstrip()
            return f"{err.get('type')}: {err.get('message')}\n{tail}"
        return f"exit code {code}"

    def _resume_hint(self) -> str:
        from .checkpoints import latest_checkpoint

        if latest_checkpoint(self.out):
            return f" (continue with: pyengine-train --resume {self.out})"
        return f" (no checkpoint was written yet: pyengine-train --resume {self.out} starts the run again from step 0)"
