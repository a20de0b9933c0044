"""Checkpoints that load at any world size and either ZeRO stage.

Note [checkpoint folders]: engine.save(path) writes a folder:

    index.json          names, shapes and canonical offsets of the parameters, the optimizer,
                        the files, the world size and stage it was saved at (rank 0)
    meta.pt             param groups, step counts, loss scaler, model buffers, `extra` (rank 0)
    shard-R-of-N.pt     runs of the canonical flat fp32 master weights and optimizer state:
                        with ZeRO-1 every rank writes the slices it owns, else rank 0 all of it

"Canonical flat": the parameters' elements packed in registration order without padding, so
a checkpoint does not depend on the buffer layout, the bucket rebuild, the number of ranks or
the stage; a loading rank copies from the runs whatever its own layout needs (flat.py). Each
file carries a SHA-256 and is written atomically (checkfile.py); the folder is filled under a
temporary name and renamed into place by rank 0 once every rank's shard is in, so a crash
leaves the previous checkpoint and no partial one. The weights must be finite on every rank,
or nothing is written.

engine.state_dict() / load_state_dict() keep the in-memory form for unsharded state, and
engine.optimizer.state_dict() is torch.optim's.
"""
import json
import os
import shutil

import torch

from . import ops
from .checkfile import CheckpointError, read_file, write_file
from .flat import copy_runs
from .optim import check_group

CHECKPOINT_VERSION = 2
__all__ = ["CheckpointError", "save", "load", "read", "state_dict", "load_state_dict", "optimizer_state_dict",
           "load_optimizer_state_dict"]


# -- save -----------------------------------------------------------------------------------------
def save(engine, path, extra=None) -> str:
    """Every rank calls it (collectives inside); returns the folder's path. `engine`: the
    Engine's parts (build.py), as in every function here."""
    if engine.micro_step != 0:
        raise RuntimeError(
            f"Engine.save: {engine.micro_step} micro-batch(es) of the current accumulation window are pending; "
            "their gradients would be lost. Save right after the boundary step")
    if engine.flat.sharded:
        engine.reducer.wait_params()
    try:
        check_finite(engine)
        bad = None
    except FloatingPointError as exc:
        bad = exc
    _agree(engine, bad is None, "the weights are finite", bad)
    path = os.path.abspath(os.fspath(path))
    partial = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
    writes = engine.flat.sharded or engine.rank == 0
    writers = engine.world_size if engine.flat.sharded else 1
    error = None
    if engine.rank == 0:
        try:
            shutil.rmtree(partial, ignore_errors=True)  # what a crash left
            os.makedirs(partial)
        except OSError as exc:
            error = exc
    _agree(engine, error is None, "the folder was created", error)
    error = None
    if writes:
        try:
            write_file(_shard(engine), os.path.join(partial, _shard_name(engine.rank if engine.flat.sharded else 0,
                                                                         writers)))
        except Exception as exc:
            error = exc
    _agree(engine, error is None, "every shard was written", error)
    if writers > 1:
        # Note: each rank wrote into `partial` as it resolves on its own machine; without a
        # filesystem shared by all of them, rank 0's folder lacks the others' shards, and an
        # index naming them would put an incomplete checkpoint in place that fails only when
        # loaded. So rank 0 looks for every shard, and all ranks fail together at this first
        # save. A shard another machine just wrote can be late to show on a network
        # filesystem: a missing one is looked for again for a few seconds before giving up.
        import time

        missing = []
        if engine.rank == 0:
            names = [_shard_name(r, writers) for r in range(writers)]
            for attempt in range(11):
                missing = [r for r, name in enumerate(names) if not os.path.exists(os.path.join(partial, name))]
                if not missing or attempt == 10:
                    break
                time.sleep(0.5)
        if not all(ranks_ok(engine, not missing)):
            missing = engine.comm.broadcast_ints(missing, src=0)  # every rank learns which shards rank 0 lacks
            first = missing[0]
            folders = [os.fsdecode(bytes(engine.comm.broadcast_ints(
                list(os.fsencode(partial)) if engine.rank == src else [], src=src))) for src in (0, first)]
            if engine.rank == 0 or engine.rank in missing:  # what this rank left on its own machine
                shutil.rmtree(partial, ignore_errors=True)
            more = f" (and {len(missing) - 1} more shard(s) of other ranks)" if len(missing) > 1 else ""
            raise CheckpointError(
                f"pyengine: checkpoint {os.path.basename(path)} not saved: {_shard_name(first, writers)}, written by "
                f"rank {first} into its folder {folders[1]}, is not in rank 0's folder {folders[0]}{more}. Every rank "
                "must write into the same folder; use a shared filesystem for --out (or engine.save path)")
    if engine.rank == 0:
        try:
            write_file(_meta(engine, extra), os.path.join(partial, "meta.pt"))
            with open(os.path.join(partial, "index.json"), "w") as f:
                json.dump(_index(engine, writers), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _replace_folder(partial, path)
        except Exception as exc:
            error = exc
    _agree(engine, error is None, "the index was written and the folder put in place", error)
    return path


def check_finite(engine) -> bool:
    """Raises FloatingPointError naming the first parameters whose master weights or
    optimizer state hold inf/NaN on this rank; True when all are finite."""
    flat = engine.flat
    runs = [(b, c0, off, n) for b, pieces in [(flat.master_flat, flat.owned_master_pieces()),
                                              *((t, flat.pieces()) for t in flat.state.values())]
            for c0, n, off in pieces]
    if not runs:
        return True
    finite = torch.stack([torch.isfinite(b[off:off + n]).all() for b, _, off, n in runs])
    if bool(finite.all()):  # one host read for the whole check
        return True
    bad = []
    for (_, c0, _, _), ok in zip(runs, finite.tolist()):
        name = engine.names[flat._param_at(c0)[0]]
        if not ok and name not in bad:
            bad.append(name)
    raise FloatingPointError(
        f"pyengine: not saving a checkpoint whose weights or optimizer state hold inf/NaN (first: "
        f"{', '.join(bad[:5])}); the previous checkpoint is kept. Training has "
        "diverged: lower the lr, check the data, or use bf16")


def ranks_ok(engine, ok) -> list:
    """Every rank's `ok`, by rank (a collective: all ranks call it)."""
    return engine.comm.all_gather_int(int(bool(ok))) if engine.world_size > 1 else [int(bool(ok))]


def _agree(engine, ok, what, error=None):
    """Every rank learns whether all succeeded (a collective: all ranks call it), and all
    raise if one did not: `error` where it happened, a note elsewhere."""
    oks = ranks_ok(engine, ok)
    if all(oks):
        return
    if error is not None:
        raise error
    bad = [r for r, v in enumerate(oks) if not v]
    raise RuntimeError(f"pyengine: checkpoint not saved: on rank(s) {bad}, not {what}; the previous one is kept")


def _shard(engine):
    """This rank's runs of the canonical master weights and optimizer state."""
    flat = engine.flat
    master, states = flat.owned_master_pieces(), flat.pieces()
    out = {"master": _gather_runs(flat.master_flat, master), "master_runs": [(c, n) for c, n, _ in master],
           "runs": [(c, n) for c, n, _ in states]}
    for name, t in flat.state.items():
        out[name] = _gather_runs(t, states)
    return out


def _gather_runs(t, pieces):
    if not pieces:
        return torch.zeros(0)
    return torch.cat([t[off:off + n] for _, n, off in pieces]).detach().cpu()


def _meta(engine, extra):
    opt = engine.optimizer
    return {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "param_steps": engine.counts.per_param().cpu().to(torch.int64), "scaler": engine.scaler.state_dict(),
            "boundaries": engine.boundary_steps,
            "model_buffers": {k: b.detach().cpu().clone() for k, b in engine.model.named_buffers()},
            "extra": dict(extra) if extra is not None else None}


def _index(engine, writers):
    flat = engine.flat
    return {"format": "pyengine-checkpoint", "version": CHECKPOINT_VERSION,
            "params": [{"name": n, "shape": list(p.shape), "offset": flat.canon[i], "numel": p.numel()}
                       for i, (n, p) in enumerate(zip(engine.names, engine.params))],
            "optimizer": engine.optimizer.spec.name, "states": list(flat.state),
            "groups": [sorted(g.members) for g in flat.layout.groups],
            "world_size": engine.world_size, "zero_stage": engine.config.zero_stage,
            "shards": [_shard_name(r, writers) for r in range(writers)], "meta": "meta.pt",
            "config": engine.config.to_dict()}


def _shard_name(rank, count):
    return f"shard-{rank}-of-{count}.pt"


def _replace_folder(new, final):
    """new's contents at final; at no moment is neither the old nor the new one there."""
    old = f"{final}.old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(new, final)
    shutil.rmtree(old, ignore_errors=True)
    fd = os.open(os.path.dirname(final), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- load -----------------------------------------------------------------------------------------
def load(engine, path):
    """Loads a checkpoint folder saved at any world size and stage; returns (its `extra`,
    the boundary count), for the pipeline to start a fresh window."""
    path = os.fspath(path)
    if not os.path.isdir(path) and os.path.isdir(f"{path}.old"):
        path = f"{path}.old"  # a save was interrupted between its two renames
    if os.path.isfile(path):
        raise CheckpointError(f"Engine.load: {path} is a file; this version of pyengine saves and loads checkpoint "
                              "folders (index.json, meta.pt, shard-R-of-N.pt). A single-file checkpoint comes from "
                              "an earlier version: load it there with engine.load_state_dict and save a folder")
    index_path = os.path.join(path, "index.json")
    if not os.path.exists(index_path):
        raise FileNotFoundError(f"Engine.load: no checkpoint at {path} (no index.json)")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except ValueError as exc:
        raise CheckpointError(f"{index_path} is damaged: {exc}") from None
    _check_index(engine, index, path)
    flat = engine.flat
    meta = read_file(os.path.join(path, index["meta"]))
    _check_groups(engine, len(meta["param_groups"]), "Engine.load")
    for s in index["states"]:
        if s in engine.optimizer.spec.torch_states:
            flat.add_state(s)  # SGD momentum buffers the checkpoint has and this engine has not made yet
    master_pieces, state_pieces = flat.master_pieces(), flat.pieces()
    states = list(flat.state)
    with torch.no_grad():
        params = flat.whole_pieces()
        for name in index["shards"]:
            shard = read_file(os.path.join(path, name))
            master = list(_runs(shard["master_runs"], shard["master"]))
            copy_runs(master, flat.master_flat, master_pieces)
            copy_runs(master, flat.param_flat, params)  # every parameter, cast: no all-gather needed
            for s in states:
                copy_runs(_runs(shard["runs"], shard[s]), flat.state[s], state_pieces)
        _load_steps(engine, meta)
        _load_groups(engine, meta["param_groups"])
        engine.scaler.load_state_dict(meta["scaler"], index.get("config", {}).get("precision"))
        bufs = dict(engine.model.named_buffers())
        for k, b in meta["model_buffers"].items():
            if k in bufs:
                bufs[k].copy_(b)
    return meta.get("extra"), int(meta["boundaries"])


def read(path) -> dict:
    """A checkpoint folder as plain tensors, for inspection or conversion, without an engine:
    {"index", "meta", "master", <state name>...}, each a canonical flat fp32 tensor (parameter
    i at index["params"][i]["offset"], numel elements)."""
    path = os.fspath(path)
    with open(os.path.join(path, "index.json")) as f:
        index = json.load(f)
    total = sum(p["numel"] for p in index["params"])
    out = {"index": index, "meta": read_file(os.path.join(path, index["meta"])), "master": torch.zeros(total)}
    for name in index["states"]:
        out[name] = torch.zeros(total)
    whole = [(0, total, 0)]
    for shard_name in index["shards"]:
        shard = read_file(os.path.join(path, shard_name))
        copy_runs(_runs(shard["master_runs"], shard["master"]), out["master"], whole)
        for name in index["states"]:
            copy_runs(_runs(shard["runs"], shard[name]), out[name], whole)
    return out


def _check_index(engine, index, path):
    if index.get("format") != "pyengine-checkpoint" or index.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is not a pyengine checkpoint of this version")
    names = [p["name"] for p in index["params"]]
    if names != list(engine.names):
        missing = sorted(set(engine.names) - set(names))[:5]
        unknown = sorted(set(names) - set(engine.names))[:5]
        raise ValueError(f"Engine.load: the checkpoint's parameters differ from the model's (missing from the "
                         f"checkpoint: {missing}, unknown to the model: {unknown})")
    for p, name, param in zip(index["params"], engine.names, engine.params):
        if list(param.shape) != p["shape"]:
            raise ValueError(f"Engine.load: {name} has shape {p['shape']} in the checkpoint, {list(param.shape)} in "
                             "the model")
    if index["optimizer"] != engine.optimizer.spec.name:
        raise ValueError(f"Engine.load: checkpoint optimizer is {index['optimizer']!r}, this engine uses "
                         f"{engine.optimizer.spec.name!r}")
    missing_states = sorted(set(engine.flat.state) - set(index["states"]))
    if missing_states:
        raise ValueError(f"Engine.load: the checkpoint lacks optimizer state {missing_states}")
    groups = [sorted(g.members) for g in engine.flat.layout.groups]
    if "groups" in index and index["groups"] != groups:
        raise ValueError(f"Engine.load: the checkpoint's param groups hold other parameters than this engine's "
                         f"({[len(g) for g in index['groups']]} parameters per group saved, "
                         f"{[len(g) for g in groups]} now): its lr and weight decay would reach the wrong parameters; "
                         "build the Engine with the same param_groups")
    absent = [s for s in index["shards"] if not os.path.exists(os.path.join(path, s))]
    if absent:
        raise CheckpointError(f"{path} is incomplete: {', '.join(absent)} missing")


def _runs(runs, values):
    pos = 0
    for c0, n in runs:
        yield c0, values[pos:pos + n]
        pos += n


def _check_groups(engine, saved, what):
    """Before anything is written: the saved param groups must be the engine's."""
    if saved != len(engine.optimizer.param_groups):
        raise ValueError(f"{what}: the checkpoint has {saved} param group(s), this engine "
                         f"{len(engine.optimizer.param_groups)}; build the Engine with the same param_groups")


# -- in memory (unsharded state) ------------------------------------------------------------------
def state_dict(engine) -> dict:
    if engine.micro_step != 0:
        raise RuntimeError(
            f"Engine.state_dict: {engine.micro_step} micro-batch(es) of the current accumulation window are pending; "
            "their gradients would be lost. Save right after the boundary step")
    _unsharded(engine, "Engine.state_dict")
    flat, opt = engine.flat, engine.optimizer
    n = len(engine.params)
    return {
        "version": 1,
        "config": engine.config.to_dict(),
        "param_names": list(engine.names),
        "master": [flat.master_view(i).detach().clone().cpu() for i in range(n)],
        "optimizer": {
            "kind": opt.spec.name,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "state": [{k: flat.view(v, i).clone().cpu() for k, v in flat.state.items()} for i in range(n)],
            "param_steps": engine.counts.per_param().cpu().to(torch.int64),
        },
        "scaler": engine.scaler.state_dict(),
        "boundaries": engine.boundary_steps,
        "model_buffers": {k: b.detach().cpu().clone() for k, b in engine.model.named_buffers()},
    }


def load_state_dict(engine, sd: dict) -> int:
    """Returns the boundary count, for the pipeline to start a fresh window."""
    _unsharded(engine, "Engine.load_state_dict")
    if not isinstance(sd, dict) or sd.get("version") != 1:
        raise ValueError("Engine.load_state_dict: not a pyengine state dict (from engine.state_dict()); a checkpoint "
                         "folder loads with engine.load(path)")
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
    _check_groups(engine, len(o["param_groups"]), "Engine.load_state_dict")
    flat = engine.flat
    for s in {k for entry in o["state"] for k in entry}:
        if s in opt.spec.torch_states:
            flat.add_state(s)
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
        if flat.master_separate:
            ops.cast_scale(flat.master_flat, flat.param_flat)
        _load_steps(engine, o)
        _load_groups(engine, o["param_groups"])
        engine.scaler.load_state_dict(sd["scaler"], sd.get("config", {}).get("precision"))
        bufs = dict(engine.model.named_buffers())
        for k, b in sd.get("model_buffers", {}).items():
            if k in bufs:
                bufs[k].copy_(b)
    return int(sd.get("boundaries", 0))


def _unsharded(engine, what):
    if engine.flat.sharded:
        raise RuntimeError(f"{what}: with zero_stage=1 each rank holds 1/{engine.world_size} of the master weights "
                           "and optimizer state; save and load them with engine.save(folder) / engine.load(folder), "
                           "which work at any world size")


# -- engine.optimizer.state_dict(): torch.optim's format ---------------------------------------
def optimizer_state_dict(engine) -> dict:
    """{"state": {k: {"step", exp_avg, ...}}, "param_groups": [{..., "params": [k, ...]}]}, with
    parameters numbered as torch.optim numbers them (group by group), each state tensor in
    its parameter's shape. Saved between steps it is what torch.optim.AdamW would hold."""
    _unsharded(engine, "engine.optimizer.state_dict")
    opt, flat = engine.optimizer, engine.flat
    index = {id(p): i for i, p in enumerate(engine.params)}
    steps = engine.counts.per_param().tolist()
    counted = opt.spec.name != "sgd"  # torch.optim.SGD keeps no step count
    state, groups, k = {}, [], 0
    for gi, g in enumerate(opt.param_groups):
        ids = []
        for p in g["params"]:
            i = index[id(p)]
            ids.append(k)
            k += 1
            if steps[i] == 0:
                continue  # never stepped: torch.optim holds no state for it yet
            entry = {"step": _step_tensor(steps[i])} if counted else {}
            for name in opt.spec.torch_states:
                if name in flat.state:
                    entry[name] = flat.view(flat.state[name], i).detach().clone().cpu().view(p.shape)
            if entry:  # torch.optim.SGD without momentum keeps none
                state[k - 1] = entry
        groups.append({**{key: v for key, v in g.items() if key != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}


def load_optimizer_state_dict(engine, sd: dict):
    _unsharded(engine, "engine.optimizer.load_state_dict")
    opt, flat = engine.optimizer, engine.flat
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("engine.optimizer.load_state_dict: expected torch.optim's format "
                         "({'state': ..., 'param_groups': ...})")
    if len(sd["param_groups"]) != len(opt.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(sd["param_groups"], opt.param_groups)):
        raise ValueError("engine.optimizer.load_state_dict: the saved param groups do not match this engine's "
                         "(number of groups or of parameters per group)")
    index = {id(p): i for i, p in enumerate(engine.params)}
    steps = engine.counts.per_param().tolist()
    for saved, g in zip(sd["param_groups"], opt.param_groups):  # checked before anything is written
        check_group(opt.spec, {**g, **{k: v for k, v in saved.items() if k != "params"}},
                    "engine.optimizer.load_state_dict: param_groups", fixed=False)
    for entry in sd["state"].values():
        for s in entry:
            if s in opt.spec.torch_states and entry[s] is not None:
                flat.add_state(s)
    with torch.no_grad():
        for gi, (saved, g) in enumerate(zip(sd["param_groups"], opt.param_groups)):
            for k, p in zip(saved["params"], g["params"]):
                entry = sd["state"].get(k)
                i = index[id(p)]
                if entry is None:  # torch.optim has not stepped it: a fresh state
                    for t in flat.state.values():
                        flat.view(t, i).zero_()
                    steps[i] = 0
                    continue
                for name in opt.spec.torch_states:
                    if name in flat.state:
                        if name in entry and entry[name] is not None:
                            flat.view(flat.state[name], i).copy_(entry[name].reshape(-1))
                        else:
                            flat.view(flat.state[name], i).zero_()
                if "step" in entry:
                    steps[i] = int(float(entry["step"]))
                elif entry.get("momentum_buffer") is not None:
                    steps[i] = max(steps[i], 1)  # SGD keeps no count: a buffer that exists is past its first step
            g.update({key: v for key, v in saved.items() if key != "params"})
        engine.counts.load_per_param(steps)
        _mark_born(engine)


# -- step counts and param groups -------------------------------------------------------------
def _step_tensor(step: int) -> torch.Tensor:
    """A step count in torch.optim's format (a float32 tensor), exact above 2**24 too."""
    return torch.tensor(float(step), dtype=torch.float32 if step <= 2**24 else torch.float64)


def _load_steps(engine, saved):
    """Per-parameter step counts (or, from older checkpoints, one per param group)."""
    if "param_steps" in saved:
        engine.counts.load_per_param([int(s) for s in saved["param_steps"].reshape(-1).tolist()])
    else:
        engine.counts.load_per_group([int(s) for s in saved["steps"].reshape(-1).tolist()])


def _load_groups(engine, saved_groups):
    opt = engine.optimizer
    for saved, g in zip(saved_groups, opt.param_groups):
        check_group(opt.spec, {**g, **saved}, "the checkpoint's param_groups", fixed=False)
    for g, saved in zip(opt.param_groups, saved_groups):
        g.update(saved)
    _mark_born(engine)


def _mark_born(engine):
    """SGD: the groups whose momentum is on have their buffers (loaded, or zero and counted)."""
    key = engine.optimizer.spec.momentum_key
    if key is not None and "momentum_buffer" in engine.flat.state:
        for gi, g in enumerate(engine.optimizer.param_groups):
            if g[key] > 0:
                engine.counts.mark_born(gi)
