"""Runs a function on several local ranks, as torchrun would set them up (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT on loopback). Used by the benchmarks and the tests."""
import io
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, threads, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    import torch
    import torch.distributed as dist

    import pyengine

    torch.set_num_threads(threads)
    pyengine.set_num_threads(threads)
    try:
        result = fn(rank, world, *args)
        # Tensors would travel as shared-memory handles that die with this process: send bytes.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException as exc:
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn, world, *args, timeout=1800, threads=None):
    """fn(rank, world, *args) in `world` processes; returns {rank: ("ok", result) or ("error", text)}.
    A rank that dies without a word is missing from the result."""
    import torch

    threads = threads or max(1, (os.cpu_count() or 1) // world)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, threads, args, queue)) for r in range(world)]
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
                value = torch.load(io.BytesIO(value), weights_only=False)
            results[rank] = (status, value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return results


def spawn(fn, world, *args, timeout=1800):
    """Rank 0's result of fn on `world` ranks; raises when any rank failed."""
    results = run_ranks(fn, world, *args, timeout=timeout)
    errors = {r: v for r, (s, v) in results.items() if s != "ok"}
    if errors or 0 not in results:
        raise RuntimeError(f"benchmark ranks failed: {errors or 'no result from rank 0'}")
    return results[0][1]
