"""Byte-level data for the main job: each rank reads and tokenizes only its own shard.

Note: the corpus is the concatenation of the input files (sorted by path); rank r reads the
byte range [r*T/W, (r+1)*T/W) of it straight from disk, so no data moves between ranks and
one big file shards as well as many small ones. The last `val_fraction` of each shard is
held out. Batches are a pure function of (seed, rank, step), so a resumed run sees exactly
the batches it would have seen.

Note [the same batches at any number of ranks]: under --deterministic (StepData) a batch
does not depend on the ranks at all. The G micro-batches of step s are numbered 0..G-1 over
the whole step, and micro-batch j draws its windows from the whole corpus (capped at
--max-data-mb bytes in total, the last `val_fraction` of it held out) with a generator
seeded from (seed, s, j) alone; rank r of d runs j in [r*G/d, (r+1)*G/d). Held-out batch i
is seeded from (seed, i) alone and evaluated on rank i % d. No rank holds the corpus: each
reads the bytes of its own windows from disk (Corpus.read), so the data a step sees, and the
bytes each rank reads, are the same whether it runs on 1, 2 or 4 ranks.
"""
import bisect
import sysconfig
from collections import OrderedDict
from pathlib import Path

import torch

VAL_FRACTION = 0.05  # of the data held out
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
    def __init__(self, path, rank, world, seq_len, max_bytes, val_fraction=VAL_FRACTION):
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

    def prompt(self, n):
        """The first n held-out bytes (the text sample's prompt)."""
        return self.val[:n]


class Corpus:
    """The sorted concatenation of `files`, its first `max_bytes` bytes when given, read a
    window at a time: files are opened when first read (a few kept open) and nothing is
    read but the ranges asked for. `bytes_read` counts what came from disk."""

    keep_open = 8

    def __init__(self, files, max_bytes=None):
        self.files, self.starts, self.sizes = [], [], []
        pos = 0
        for f in files:
            n = Path(f).stat().st_size
            if max_bytes is not None:
                n = min(n, max_bytes - pos)
            if n <= 0:
                if max_bytes is not None and pos >= max_bytes:
                    break
                continue  # an empty file adds nothing
            self.files.append(Path(f))
            self.starts.append(pos)
            self.sizes.append(n)
            pos += n
        self.size = pos
        self.bytes_read = 0
        self._open = OrderedDict()

    def read(self, lo, hi) -> bytes:
        """Bytes [lo, hi) of the corpus, across as many files as the range spans."""
        if not 0 <= lo <= hi <= self.size:
            raise IndexError(f"bytes [{lo}, {hi}) are outside the corpus of {self.size}")
        out = bytearray()
        k = bisect.bisect_right(self.starts, lo) - 1
        while lo < hi:
            off = lo - self.starts[k]
            n = min(hi - lo, self.sizes[k] - off)
            fh = self._handle(k)
            fh.seek(off)
            chunk = fh.read(n)
            if len(chunk) != n:
                raise OSError(f"{self.files[k]}: {len(chunk)} bytes at offset {off} where {n} were expected "
                              "(did the file change during the run?)")
            out += chunk
            lo += n
            k += 1
        self.bytes_read += len(out)
        return bytes(out)

    def _handle(self, k):
        fh = self._open.pop(k, None)
        if fh is None:
            fh = open(self.files[k], "rb")
            if len(self._open) >= self.keep_open:
                self._open.popitem(last=False)[1].close()
        self._open[k] = fh  # the most recently used last
        return fh

    def close(self):
        while self._open:
            self._open.popitem()[1].close()


def held_out(size, seq_len, val_fraction=VAL_FRACTION) -> int:
    """--deterministic: the bytes at the corpus's end held out, at least one window's."""
    return max(seq_len + 1, int(size * val_fraction))


class StepData:
    """--deterministic: batches that depend on (seed, step, global micro-batch) only (see
    Note [the same batches at any number of ranks])."""

    def __init__(self, path, rank, world, seq_len, max_bytes, grad_accum, val_fraction=VAL_FRACTION, files=None):
        if world & (world - 1) or grad_accum % world:
            raise ValueError(f"--deterministic: {world} rank(s) must be a power of two dividing --grad-accum "
                             f"{grad_accum}")
        self.corpus = Corpus(corpus_files(path) if files is None else files, max_bytes)
        self.seq_len, self.rank, self.world = seq_len, rank, world
        n_val = held_out(self.corpus.size, seq_len, val_fraction)
        self.n_train = self.corpus.size - n_val
        if self.n_train < seq_len + 1:
            raise ValueError(f"the corpus holds {self.corpus.size} bytes: too little for seq_len {seq_len}; use more "
                             "data or a larger --max-data-mb")
        self.n_val = n_val
        per_rank = grad_accum // world
        self.micros = range(rank * per_rank, (rank + 1) * per_rank)  # this rank's global micro-batches

    def eval_indices(self, n_batches):
        """The held-out batches this rank evaluates: i with i % world == rank."""
        return range(self.rank, n_batches, self.world)

    def _batch(self, lo, n, batch, gen):
        width = self.seq_len + 1
        starts = torch.randint(0, n - width + 1, (batch,), generator=gen).tolist()
        rows = b"".join(self.corpus.read(lo + s, lo + s + width) for s in starts)
        chunk = torch.frombuffer(bytearray(rows), dtype=torch.uint8).to(torch.int64).view(batch, width)
        return chunk[:, :-1], chunk[:, 1:]

    def train_batch(self, seed, step, micro, batch):
        """Global micro-batch `micro` (0..G-1) of step `step`."""
        return self._batch(0, self.n_train, batch, torch.Generator().manual_seed(_mix(seed, step, micro, 2)))

    def val_batch(self, seed, i, batch):
        return self._batch(self.n_train, self.n_val, batch, torch.Generator().manual_seed(_mix(seed, i, 3)))

    def prompt(self, n):
        n = min(n, self.n_val)
        return torch.frombuffer(bytearray(self.corpus.read(self.n_train, self.n_train + n)),
                                dtype=torch.uint8).to(torch.int64)


def make_data(args, rank, world):
    """The main job's data for this rank: StepData under --deterministic, else ShardData."""
    if getattr(args, "deterministic", False):
        return StepData(args.data, rank, world, args.seq_len, int(args.max_data_mb * 1e6), args.grad_accum)
    return ShardData(args.data, rank, world, args.seq_len, int(args.max_data_mb * 1e6))


def rank_micros(args, data):
    """The micro-batches this rank runs each step, as the numbers train_batch takes: the
    rank's share of the step's G under --deterministic, else 0..grad_accum-1 of its own."""
    return data.micros if isinstance(data, StepData) else range(args.grad_accum)


def rank_eval_batches(args, data):
    """The held-out batches this rank evaluates."""
    return data.eval_indices(args.eval_batches) if isinstance(data, StepData) else range(args.eval_batches)


def _mix(*values):
    """A seed from integers, the same in every process (unlike hash() of a tuple with str)."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h
