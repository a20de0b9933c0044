"""Checksummed files: a 56-byte header (magic, SHA-256 of the payload, payload length) and
torch.save's payload, written atomically.

Note: the file is written to a temporary name beside the target, fsynced and renamed over
it, so a crash leaves the old file whole; temporary files of writers that died are removed
by the next write in that folder. read_file() checks the length and the hash before it
unpickles anything.
"""
import hashlib
import io
import os
import re
import tempfile

import torch

MAGIC = b"PYENGINE-CKPT\x00\x01\x00"  # 16 bytes; the last two: format version 1
HEADER_BYTES = len(MAGIC) + 32 + 8
_TMP = re.compile(r"^\.pyengine-(\d+)-.*\.tmp$")


class CheckpointError(ValueError):
    """A checkpoint file is damaged, truncated, or not a pyengine checkpoint."""


def write_file(obj, path):
    """torch.save(obj) behind a checksummed header, atomically (temporary file, fsync, rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".pyengine-{os.getpid()}-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * HEADER_BYTES)
            writer = _HashingWriter(f)
            torch.save(obj, writer)
            f.seek(0)
            f.write(MAGIC + writer.hash.digest() + writer.size.to_bytes(8, "little"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_file(path):
    """The object write_file stored at path; CheckpointError when the file is damaged.
    A file without the header (written before checksums existed) loads unverified."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        if not head.startswith(MAGIC):
            f.seek(0)
            if head[:2] != b"PK":  # torch.save's zip format starts so
                raise CheckpointError(f"{path} is not a pyengine checkpoint")
            return torch.load(f, map_location="cpu", weights_only=False)
        if len(head) < HEADER_BYTES:
            raise CheckpointError(f"{path} is truncated (header)")
        digest, size = head[len(MAGIC):len(MAGIC) + 32], int.from_bytes(head[-8:], "little")
        payload = f.read(size + 1)
    if len(payload) != size:
        raise CheckpointError(f"{path} is truncated or has trailing bytes ({len(payload)} bytes, {size} expected)")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path} is damaged: its checksum does not match its contents")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)


def remove_stale_temporaries(folder):
    """Temporary files left by saves whose process died (the pid is in the name)."""
    for name in os.listdir(folder):
        m = _TMP.match(name)
        if m and not _alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def _alive(pid) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _HashingWriter:
    """The file object torch.save writes through: hashes and counts what passes."""

    def __init__(self, f):
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def write(self, b):
        self.hash.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()
