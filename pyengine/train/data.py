"""Byte-level data for the main job: each rank reads and tokenizes only its own shard.

Note: the corpus is the concatenation of the input files (sorted by path); rank r reads the
byte range [r*T/W, (r+1)*T/W) of it straight from disk, so no data moves between ranks and
one big file shards as well as many small ones. The last `val_fraction` of each shard is
held out. Batches are a pure function of (seed, rank, step), so a resumed run sees exactly
the batches it would have seen.
"""
import sysconfig
from pathlib import Path

import torch

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml", ".cfg", ".ini", ".csv", ".html", ""}


def default_corpus_files():
    """The Python standard library's source, found on this machine (no download)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())
    if not files:
        raise FileNotFoundError(f"no Python sources under {root}; pass --data PATH")
    return files


def corpus_files(path):
    if path is None:
        return default_corpus_files()
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"--data {path}: the folder holds no text files")
        return files
    raise FileNotFoundError(f"--data {path}: no such file or folder")


def read_shard(files, rank, world, max_bytes):
    """This rank's byte range of the concatenated files, at most max_bytes of it."""
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    if total == 0:
        raise ValueError("the corpus is empty")
    lo, hi = rank * total // world, (rank + 1) * total // world
    hi = min(hi, lo + max_bytes)
    out = bytearray()
    pos = 0
    for f, n in zip(files, sizes):
        if pos + n > lo and pos < hi:
            with open(f, "rb") as fh:
                start = max(0, lo - pos)
                fh.seek(start)
                out += fh.read(min(n, hi - pos) - start)
        pos += n
        if pos >= hi:
            break
    return torch.frombuffer(out, dtype=torch.uint8).to(torch.int64)  # bytearray: writable, no copy


class ShardData:
    def __init__(self, path, rank, world, seq_len, max_bytes, val_fraction=0.05):
        tokens = read_shard(corpus_files(path), rank, world, max_bytes)
        # each split needs more than seq_len + 1 bytes to cut one (input, target) window from
        n_val = max(seq_len + 2, int(tokens.numel() * val_fraction))
        if tokens.numel() < n_val + seq_len + 2:
            raise ValueError(f"rank {rank}'s shard holds {tokens.numel()} bytes: too little for seq_len {seq_len}; "
                             "use more data or fewer ranks")
        self.train, self.val = tokens[:-n_val], tokens[-n_val:]
        self.seq_len = seq_len
        self.rank = rank

    def _batch(self, data, batch, gen):
        starts = torch.randint(0, data.numel() - self.seq_len - 1, (batch,), generator=gen)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def train_batch(self, seed, step, micro, batch):
        return self._batch(self.train, batch, torch.Generator().manual_seed(_mix(seed, self.rank, step, micro, 0)))

    def val_batch(self, seed, i, batch):
        return self._batch(self.val, batch, torch.Generator().manual_seed(_mix(seed, self.rank, i, 0, 1)))


def _mix(*values):
    """A seed from integers, the same in every process (unlike hash() of a tuple with str)."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h
