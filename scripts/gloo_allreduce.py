#!/usr/bin/env python3
"""PyTorch gloo all-reduce bus bandwidth: a same-run reference of `strata bench allreduce`.

Usage: scripts/gloo_allreduce.py --world 2 --sizes 1,16,64 --iters 7

Starts --world processes on 127.0.0.1 (torch.distributed, gloo backend, TCP rendezvous
on a free port), like the Strata benchmark's workers. For each size (MiB of float32)
every rank runs iters + 2 all-reduces (sum), each after a barrier; the first two are
not timed, and the first one's sums are checked. Rank 0 prints one JSON line per size:
{"world": N, "bytes": B, "seconds": median, "busbw_gbps": B * 2(N-1)/N / median / 1e9,
"cpu_seconds": CPU seconds of rank 0's process per timed all-reduce}.
Exits with status 3 when torch or its gloo backend is missing.
"""

import argparse
import json
import os
import socket
import sys
import time


def worker(rank, world, port, sizes_mib, iters):
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for mib in sizes_mib:
            n = mib << 18
            buf = torch.full((n,), float(rank + 1), dtype=torch.float32)
            want = float(world * (world + 1) // 2)
            times = []
            cpu = 0.0
            for i in range(iters + 2):
                dist.barrier()
                start, cpu_start = time.perf_counter(), time.process_time()
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                t = time.perf_counter() - start
                if i >= 2:
                    cpu += time.process_time() - cpu_start
                if i == 0:
                    bad = (buf != want).nonzero()
                    if len(bad):
                        p = int(bad[0])
                        raise SystemExit(f"gloo all_reduce of {mib} MiB on rank {rank}: "
                                         f"element {p} is {float(buf[p])} instead of {want}")
                elif i >= 2:
                    times.append(t)
            times.sort()
            if rank == 0:
                seconds = times[len(times) // 2]
                nbytes = n * 4
                bus = nbytes * 2 * (world - 1) / world / seconds / 1e9
                print(json.dumps({"world": world, "bytes": nbytes, "seconds": seconds, "busbw_gbps": bus,
                                  "cpu_seconds": cpu / iters}), flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--sizes", default="1,16,64", help="MiB, comma-separated")
    p.add_argument("--iters", type=int, default=7)
    a = p.parse_args()
    try:
        import torch.distributed as dist
        import torch.multiprocessing as mp
    except ImportError as e:
        print(f"gloo_allreduce: {e}", file=sys.stderr)
        sys.exit(3)
    if not dist.is_available() or not dist.is_gloo_available():
        print("gloo_allreduce: this torch has no gloo backend", file=sys.stderr)
        sys.exit(3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sizes = [int(x) for x in a.sizes.split(",") if x]
    mp.spawn(worker, args=(a.world, port, sizes, a.iters), nprocs=a.world, join=True)


if __name__ == "__main__":
    main()
