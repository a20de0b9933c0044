"""Spawns gloo ranks on loopback, as torchrun would (RANK/WORLD_SIZE/LOCAL_RANK set)."""
import io
import multiprocessing as mp
import queue as queue_mod
import os
import socket
import time
import traceback


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    import pyengine

    torch.set_num_threads(1)
    pyengine.set_num_threads(1)
    try:
        result = fn(rank, world, *args)
        # Tensors would travel as shared-memory handles that die with this process: send bytes.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException as exc:  # reported to the test, which decides
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn, world, *args, timeout=240):
    """Runs fn(rank, world, *args) in `world` processes; returns {rank: (status, result)}."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.time() + timeout
    try:
        while len(results) < world and time.time() < deadline:
            try:
                rank, status, value = queue.get(timeout=1.0)
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs) and queue.empty():
                    break
                continue
            if status == "ok":
                import torch

                value = torch.load(io.BytesIO(value), weights_only=False)
            results[rank] = (status, value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return results


def ok(results, world):
    errors = {r: v for r, (s, v) in results.items() if s != "ok"}
    assert not errors and len(results) == world, f"ranks failed: {errors or 'missing results'}"
    return [results[r][1] for r in range(world)]
