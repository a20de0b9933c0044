"""nccl-tests style allreduce table: size, time, algbw, busbw for each available backend.

algbw = bytes / time; busbw = algbw x 2(n-1)/n, the per-link traffic of a ring allreduce,
comparable across rank counts (as nccl-tests defines it).
"""
import statistics
import time

import torch
import torch.distributed as dist

from .common import device_name, print_table, write_results
from pyengine.testing import spawn


def _bench_rank(rank, world, device, sizes, iters):
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend)
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    comms = [("torch." + backend, None)]
    if device == "cuda":
        from pyengine.comm.nccl_comm import NcclComm, available

        if available():
            comms.append(("pyengine.nccl", NcclComm(device=dev)))
    rows = []
    for name, comm in comms:
        for nbytes in sizes:
            t = torch.ones(nbytes // 4, device=dev)

            def once(t=t, comm=comm):
                if comm is None:
                    dist.all_reduce(t)
                else:
                    comm.allreduce(t, average=False).wait()
                if device == "cuda":
                    torch.cuda.synchronize()

            for _ in range(3):
                once()
            dist.barrier()
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                once()
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            algbw = nbytes / med / 1e9
            rows.append({"backend": name, "bytes": nbytes, "time_us": med * 1e6, "algbw_GBps": algbw,
                         "busbw_GBps": algbw * 2 * (world - 1) / world})
    dist.destroy_process_group()
    return rows


def run(args):
    dev = args.device
    sizes = [1 << k for k in ((12, 20, 24) if args.quick else range(12, 28, 2))]
    iters = 5 if args.quick else 20
    world = args.nproc
    if dev == "cuda":
        world = min(world, torch.cuda.device_count())
        if world < 2:
            print("allreduce benchmark on cuda needs 2 or more GPUs; this machine has", torch.cuda.device_count())
            return 0
    rows = spawn(_bench_rank, world, dev, sizes, iters)
    print(f"allreduce, {world} ranks on {device_name(dev)}, float32, sum")
    print_table(["backend", "size (B)", "time (us)", "algbw (GB/s)", "busbw (GB/s)"],
                [[r["backend"], r["bytes"], f"{r['time_us']:.1f}", f"{r['algbw_GBps']:.2f}", f"{r['busbw_GBps']:.2f}"]
                 for r in rows])
    print(f"wrote {write_results('allreduce', dev, rows, args.out, {'world': world})}")
    return 0
