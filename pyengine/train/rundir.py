"""The run folder: one writer at a time, no silent reuse, metrics that hold each step once.

Note: the lock is an flock on <out>/.lock held by the launcher and inherited by its ranks
(the lock belongs to the open file, which each child keeps open), so it is held until the
last process of the run exits, even when the launcher itself was killed, and it is released
by the kernel whatever way they die: nothing stale is ever left to clean up.
"""
import fcntl
import json
import os
from pathlib import Path

LOCK_NAME = ".lock"
MARKERS = ("metrics.jsonl", "config.json", "summary.json")


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (in use, or holds another run)."""


def lock(out: Path) -> int:
    """An exclusive lock on the run folder; returns the open descriptor (keep it open)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        try:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        except OSError:
            pass
        os.close(fd)
        raise RunFolderError(f"{out} is in use by another pyengine-train ({holder or 'pid unknown'}); wait for it "
                             "to finish or stop it, or pass another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    os.set_inheritable(fd, True)
    return fd


def check_fresh(out: Path):
    """A new run must not write into a folder that holds another run's outputs."""
    if out.exists() and any((out / m).exists() for m in MARKERS):
        from .checkpoints import latest_checkpoint

        if latest_checkpoint(out) is None and (out / "config.json").exists():
            raise RunFolderError(f"--out {out} already holds a run that stopped before its first checkpoint: "
                                 f"pyengine-train --resume {out} starts it again from step 0 with its saved flags; "
                                 "or choose another --out (nothing was changed)")
        raise RunFolderError(f"--out {out} already holds a run; continue it with --resume {out}, or choose another "
                             "folder (nothing was changed)")


def truncate_metrics(out: Path, last_step: int):
    """metrics.jsonl after a resume from step last_step: the lines of later steps were written
    by the run that crashed after its checkpoint; they are dropped, so each step is in the file
    once."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError):
            continue  # a line cut short by the crash
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
