"""Runs a benchmark function on several local ranks (gloo on CPU, NCCL on GPU)."""
import io
import multiprocessing as mp
import os
import socket


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    import pyengine

    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    pyengine.set_num_threads(threads)
    try:
        out = fn(rank, world, *args)
        buf = io.BytesIO()
        torch.save(out, buf)
        queue.put((rank, None, buf.getvalue()))
    except BaseException as exc:
        import traceback

        queue.put((rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", None))


def spawn(fn, world, *args, timeout=1800):
    """fn(rank, world, *args) on `world` processes; returns rank 0's result (raises on failure)."""
    import torch

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world):
            rank, err, payload = queue.get(timeout=timeout)
            if err:
                errors[rank] = err
            else:
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError(f"benchmark ranks failed: {errors}")
    return results[0]
