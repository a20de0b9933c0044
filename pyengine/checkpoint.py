"""Checkpoints: the engine's state_dict / load_state_dict / save / load, and the optimizer's
state in torch.optim's own format.

Note: state is stored per parameter, by name, in the model's registration order, so a
checkpoint stays valid when the buffer layout changes (the bucket rebuild reorders it) or
the number of ranks does.
"""
import os
import tempfile

import torch

from . import ops

CHECKPOINT_VERSION = 1


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
    """Writes the checkpoint atomically (temporary file, fsync, rename); rank 0 only.
    `extra` (a dict) is stored under sd["extra"] for the caller's own state."""
    sd = state_dict(engine)
    if extra is not None:
        sd["extra"] = dict(extra)
    path = os.fspath(path)
    if engine.rank != 0:
        return path
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".pyengine-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(engine, path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"Engine.load: no checkpoint at {path}")
    load_state_dict(engine, torch.load(path, map_location="cpu", weights_only=False))


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
