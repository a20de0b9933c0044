"""Checkpoints: the engine's state_dict / load_state_dict / save / load, and the optimizer's
state in torch.optim's own format.

Note: state is stored per parameter, by name, in the model's registration order, so a
checkpoint stays valid when the buffer layout changes (the bucket rebuild reorders it) or
the number of ranks does.

Note [checkpoint files]: a file is a 56-byte header (magic, SHA-256 of the payload, payload
length) and torch.save's payload. save() refuses state with inf/NaN weights (it would
replace a good checkpoint with one that can only skip steps), writes a temporary file
beside the target, fsyncs it and renames it over the target, so a crash leaves the old file
whole; temporary files of writers that died are removed by the next save in that folder.
load() checks the length and the hash before it unpickles anything.
"""
import hashlib
import io
import os
import re
import tempfile

import torch

from . import ops

CHECKPOINT_VERSION = 1
MAGIC = b"PYENGINE-CKPT\x00\x01\x00"  # 16 bytes; the last two: format version 1
HEADER_BYTES = len(MAGIC) + 32 + 8
_TMP = re.compile(r"^\.pyengine-(\d+)-.*\.tmp$")


class CheckpointError(ValueError):
    """A checkpoint file is damaged, truncated, or not a pyengine checkpoint."""


def state_dict(engine) -> dict:
    if engine.micro_step != 0:
        raise RuntimeError(
            f"Engine.state_dict: {engine.micro_step} micro-batch(es) of the current accumulation window are pending; "
            "their gradients would be lost. Save right after the boundary step")
    flat, opt = engine.flat, engine.optimizer
    n = len(engine.params)
    return {
        "version": CHECKPOINT_VERSION,
        "config": engine.config.to_dict(),
        "param_names": list(engine.names),
        "master": [flat.master_view(i).detach().clone().cpu() for i in range(n)],
        "optimizer": {
            "kind": opt.spec.name,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "state": [{k: flat.view(v, i).clone().cpu() for k, v in flat.state.items()} for i in range(n)],
            "steps": opt.steps.cpu().clone(),
        },
        "scaler": engine.scaler.state_dict(),
        "boundaries": engine.boundary_steps,
        "model_buffers": {k: b.detach().cpu().clone() for k, b in engine.model.named_buffers()},
    }


def load_state_dict(engine, sd: dict):
    if not isinstance(sd, dict) or sd.get("version") != CHECKPOINT_VERSION:
        raise ValueError("Engine.load_state_dict: not a pyengine checkpoint (or from an incompatible version)")
    if list(sd["param_names"]) != list(engine.names):
        missing = sorted(set(engine.names) - set(sd["param_names"]))[:5]
        extra = sorted(set(sd["param_names"]) - set(engine.names))[:5]
        raise ValueError(f"Engine.load_state_dict: the checkpoint's parameters differ from the model's "
                         f"(missing from checkpoint: {missing}, unknown to the model: {extra})")
    o = sd["optimizer"]
    opt = engine.optimizer
    if o["kind"] != opt.spec.name:
        raise ValueError(f"Engine.load_state_dict: checkpoint optimizer is {o['kind']!r}, "
                         f"this engine uses {opt.spec.name!r}")
    flat = engine.flat
    with torch.no_grad():
        for i, (name, m) in enumerate(zip(engine.names, sd["master"])):
            if m.numel() != flat.layout.slots[i].numel:
                raise ValueError(f"Engine.load_state_dict: {name} has {m.numel()} elements in the checkpoint, "
                                 f"{flat.layout.slots[i].numel} in the model")
            flat.master_view(i).copy_(m.reshape(-1))
            for k, v in flat.state.items():
                if k not in o["state"][i]:
                    raise ValueError(f"Engine.load_state_dict: optimizer state of {name} lacks {k!r}")
                flat.view(v, i).copy_(o["state"][i][k].reshape(-1))
        if flat.master_flat is not flat.param_flat:
            ops.cast_scale(flat.master_flat, flat.param_flat)
        opt.steps.copy_(o["steps"].reshape(-1))
        for g, saved in zip(opt.param_groups, o["param_groups"]):
            g.update(saved)
        engine.scaler.load_state_dict(sd["scaler"])
        bufs = dict(engine.model.named_buffers())
        for k, b in sd.get("model_buffers", {}).items():
            if k in bufs:
                bufs[k].copy_(b)
    engine._after_load(int(sd.get("boundaries", 0)))


def save(engine, path, extra=None) -> str:
    """Writes the checkpoint atomically with a checksum (see Note [checkpoint files]); rank 0
    only. `extra` (a dict) is stored under sd["extra"] for the caller's own state."""
    check_finite(engine)
    sd = state_dict(engine)
    if extra is not None:
        sd["extra"] = dict(extra)
    path = os.fspath(path)
    if engine.rank != 0:
        return path
    write_file(sd, path)
    return path


def check_finite(engine):
    """Raises FloatingPointError naming the first parameters whose master weights or
    optimizer state hold inf/NaN (one host read)."""
    flat = engine.flat
    bufs = [flat.master_flat, *flat.state.values()]
    if all(bool(torch.isfinite(b).all()) for b in bufs):
        return
    bad = [n for i, n in enumerate(engine.names)
           if not all(bool(torch.isfinite(flat.view(b, i)).all()) for b in bufs)][:5] or ["the padding between them"]
    raise FloatingPointError(
        f"pyengine: not saving a checkpoint whose weights or optimizer state hold inf/NaN (first: {', '.join(bad)}); "
        "the previous checkpoint is kept. Training has diverged: lower the lr, check the data, or use bf16")


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


def load(engine, path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"Engine.load: no checkpoint at {path}")
    load_state_dict(engine, read_file(path))


# -- engine.optimizer.state_dict(): torch.optim's format ---------------------------------------
def optimizer_state_dict(engine) -> dict:
    """{"state": {k: {"step", exp_avg, ...}}, "param_groups": [{..., "params": [k, ...]}]}, with
    parameters numbered as torch.optim numbers them (group by group), each state tensor in
    its parameter's shape. Saved between steps it is what torch.optim.AdamW would hold."""
    opt, flat = engine.optimizer, engine.flat
    index = {id(p): i for i, p in enumerate(engine.params)}
    state, groups, k = {}, [], 0
    for gi, g in enumerate(opt.param_groups):
        ids = []
        for p in g["params"]:
            i = index[id(p)]
            entry = {"step": opt.steps[gi].detach().clone().cpu()}
            for name, torch_name in zip(flat.state, opt.spec.torch_states):
                entry[torch_name] = flat.view(flat.state[name], i).detach().clone().cpu().view(p.shape)
            state[k] = entry
            ids.append(k)
            k += 1
        groups.append({**{key: v for key, v in g.items() if key != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}


def load_optimizer_state_dict(engine, sd: dict):
    opt, flat = engine.optimizer, engine.flat
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("engine.optimizer.load_state_dict: expected torch.optim's format "
                         "({'state': ..., 'param_groups': ...})")
    if len(sd["param_groups"]) != len(opt.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(sd["param_groups"], opt.param_groups)):
        raise ValueError("engine.optimizer.load_state_dict: the saved param groups do not match this engine's "
                         "(number of groups or of parameters per group)")
    index = {id(p): i for i, p in enumerate(engine.params)}
    with torch.no_grad():
        for gi, (saved, g) in enumerate(zip(sd["param_groups"], opt.param_groups)):
            for k, p in zip(saved["params"], g["params"]):
                entry = sd["state"].get(k)
                if entry is None:
                    continue
                i = index[id(p)]
                for name, torch_name in zip(flat.state, opt.spec.torch_states):
                    if torch_name in entry:
                        flat.view(flat.state[name], i).copy_(entry[torch_name].reshape(-1))
                if "step" in entry:
                    opt.steps[gi] = float(entry["step"])
            g.update({key: v for key, v in saved.items() if key != "params"})
