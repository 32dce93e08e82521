"""Spawn N gloo ranks on 127.0.0.1, run a function on each, return what each returned.

    results = run_distributed(fn, world_size=4, args=(x,), timeout=120)

``fn(rank, world_size, *args)`` runs in a fresh process with MASTER_ADDR/MASTER_PORT/RANK/
WORLD_SIZE set and one torch thread (more ranks than cores here). It must be a module-level
function (spawn pickles it by name). A rank that raises, or a run that outlives ``timeout``,
fails the caller with the rank's traceback; every rank is killed either way.
"""
from __future__ import annotations

import io
import os
import queue
import time
import traceback

import torch
import torch.multiprocessing as mp

from megatron_lite.parallel.state import free_port


def _worker(fn, rank, world_size, port, args, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        out = fn(rank, world_size, *args)
        # Serialise here: shared-memory tensors would vanish with this process.
        buf = io.BytesIO()
        torch.save(out, buf)
        q.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
        q.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron_lite.parallel.state import destroy_parallel
            destroy_parallel()
        except Exception:  # noqa: BLE001
            pass


def run_distributed(fn, world_size: int, args=(), timeout: float = 180.0):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, q), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"distributed test timed out after {timeout}s; "
                                   f"ranks done: {sorted(results)}, failed: {sorted(errors)}")
            try:
                rank, ok, out = q.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs)
                        if not p.is_alive() and p.exitcode not in (0, None)
                        and i not in results and i not in errors]
                if dead:
                    raise RuntimeError(f"rank(s) {dead} died with exit codes "
                                       f"{[procs[i].exitcode for i in dead]}")
                continue
            (results if ok else errors)[rank] = out
            if errors:
                break  # other ranks may be blocked in a collective on the failed one
    finally:
        for p in procs:
            p.join(timeout=0.5 if errors or len(results) < world_size else 10)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} failed:\n{errors[rank]}")
    return [torch.load(io.BytesIO(results[r]), weights_only=False) for r in range(world_size)]


def run_entry_point(args, cwd, nproc=None, timeout=120):
    """``python -m megatron_lite.pretrain_gpt ARGS``, or under torchrun with ``nproc`` ranks on a free port."""
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc is None:
        cmd = [sys.executable, "-m", "megatron_lite.pretrain_gpt"] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "megatron_lite.pretrain_gpt"] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(cwd), env=env)


def metrics_losses(path):
    """Iteration -> training loss from a --metrics-jsonl file; a restarted run appends, and its (last)
    record of an iteration counts."""
    import json
    with open(path) as f:
        return {r["iteration"]: r["lm_loss"] for r in map(json.loads, f) if "split" not in r}
