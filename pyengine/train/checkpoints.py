"""The main job's checkpoints: numbered files, the newest few kept, damaged ones skipped.

checkpoint-<step>.pt is written atomically with a checksum (pyengine/checkpoint.py) and only
when the weights are finite; after each save all but the newest `keep` are removed. Loading
tries the newest first and falls back to an older one, with a warning, when a file is damaged.
"""
import logging
import re
from pathlib import Path
from typing import List, Optional

from pyengine.checkpoint import CheckpointError, read_file

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
log = logging.getLogger("pyengine.train")


def checkpoints(out) -> List[Path]:
    """The run's checkpoint files, newest (highest step) first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(out) -> Optional[Path]:
    found = checkpoints(out)
    return found[0] if found else None


def save(engine, out, step: int, keep: int, extra=None) -> Path:
    """Saves checkpoint-<step>.pt (every rank takes part; rank 0 writes) and prunes old ones."""
    path = Path(out) / f"checkpoint-{step:07d}.pt"
    engine.save(path, extra=extra)
    if engine.rank == 0:
        for old in checkpoints(out)[keep:]:
            old.unlink(missing_ok=True)
    return path


def load_newest_good(out):
    """(state dict, path) of the newest checkpoint that reads back intact; raises
    CheckpointError when none does."""
    found = checkpoints(out)
    if not found:
        raise CheckpointError(f"{out} holds no checkpoint")
    errors = []
    for path in found:
        try:
            sd = read_file(path)
        except (CheckpointError, OSError, RuntimeError, EOFError) as exc:
            errors.append(f"{path.name}: {exc}")
            log.warning("skipping checkpoint %s: %s", path, exc)
            continue
        if errors:
            log.warning("resuming from the older checkpoint %s", path.name)
        return sd, path
    raise CheckpointError(f"no checkpoint in {out} reads back intact: " + "; ".join(errors))
