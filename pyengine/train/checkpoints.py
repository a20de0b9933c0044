"""The main job's checkpoints: numbered folders, the newest few kept, damaged ones skipped.

checkpoint-<step> is an Engine checkpoint folder (pyengine/checkpoint.py): written
atomically with a checksum on every file, only when the weights are finite, loadable at any
world size and ZeRO stage. After each save all but the newest `keep` are removed. Loading
tries the newest first and falls back to an older one, with a warning, when one is damaged.

Note: "newest" means the highest step at or below the step just saved. A run that resumed
from an older checkpoint (the newer one was damaged, or did not read back on some rank)
has abandoned the steps after it: its metrics were cut back to that step, and a checkpoint
numbered above it holds a future the run no longer has. Such checkpoints are removed when
the run resumes (remove_after) and again by every save, so they can neither be resumed from
later nor push the checkpoint just written out of the `keep` newest.
"""
import logging
import re
import shutil
from pathlib import Path
from typing import List, Optional

from pyengine.checkfile import CheckpointError
from pyengine.checkpoint import ranks_ok

_NAME = re.compile(r"^checkpoint-(\d+)$")
log = logging.getLogger("pyengine.train")


def checkpoints(out) -> List[Path]:
    """The run's checkpoint folders, newest (highest step) first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(out) -> Optional[Path]:
    found = checkpoints(out)
    return found[0] if found else None


def step_of(path) -> int:
    return int(_NAME.match(Path(path).name).group(1))


def remove_after(out, path) -> List[str]:
    """Removes the checkpoints numbered above `path`'s (see the Note); returns their names."""
    gone = [p for p in checkpoints(out) if step_of(p) > step_of(path)]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in gone]


def any_checkpoint(engine, out) -> bool:
    """Whether the run folder holds a checkpoint, agreed by every rank (a collective): True or
    False everywhere, or CheckpointError everywhere when the ranks see different folders."""
    oks = ranks_ok(engine, bool(checkpoints(out)))
    if all(oks) or not any(oks):
        return bool(oks[0])
    blind = [r for r, v in enumerate(oks) if not v]
    raise CheckpointError(f"--resume {out}: rank(s) {blind} see no checkpoint there, the others do: every rank must "
                          "read and write the same run folder; use a shared filesystem for --out")


_LEFT = re.compile(r"^(\.checkpoint-\d+\.partial|checkpoint-\d+\.old)$")


def save(engine, out, step: int, keep: int, extra=None) -> Path:
    """Saves checkpoint-<step> (every rank takes part and writes its own shard) and prunes,
    including what interrupted saves left (the run folder's lock makes this the only writer)."""
    path = Path(out) / f"checkpoint-{step:07d}"
    if engine.rank == 0:
        for left in Path(out).iterdir():
            if _LEFT.match(left.name):
                shutil.rmtree(left, ignore_errors=True)
    engine.save(path, extra=extra)
    if engine.rank == 0:
        remove_after(out, path)  # an abandoned future's (see the Note): never "newer" than this one
        for old in [p for p in checkpoints(out) if p != path][max(0, keep - 1):]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_newest_good(engine, out):
    """(extra, path) of the newest checkpoint that loads intact into engine; raises
    CheckpointError when none does."""
    found = checkpoints(out)
    if not found:
        raise CheckpointError(f"{out} holds no checkpoint")
    errors = []
    for path in found:
        try:
            extra, error = engine.load(path), None
        except (CheckpointError, OSError, RuntimeError, EOFError) as exc:
            error = exc
        # every rank resumes from the same checkpoint: one that failed to read anywhere is skipped everywhere
        oks = ranks_ok(engine, error is None)
        if not all(oks):
            bad = [r for r, v in enumerate(oks) if not v]
            why = error if error is not None else f"it did not read back on rank(s) {bad}"
            errors.append(f"{path.name}: {why}")
            log.warning("skipping checkpoint %s: %s", path, why)
            continue
        if errors:
            log.warning("resuming from the older checkpoint %s", path.name)
        return extra, path
    raise CheckpointError(f"no checkpoint in {out} reads back intact: " + "; ".join(errors))
