"""Process groups for tensor, pipeline and data parallelism, cut from one rank grid.

Rank layout follows Megatron-LM: TP varies fastest, then DP, then PP:
    rank = tp_rank + TP * (dp_rank + DP * pp_rank)
so TP groups are runs of consecutive ranks (one node) and PP groups stride by TP * DP.

Everything that talks to other ranks takes its group from a ``ParallelState`` passed to it
explicitly (``require_state`` refuses None). ``initialize_parallel`` also remembers the state it
built, for the entry points and tests only (``get_parallel_state``).
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron_lite.errors import ParallelConfigError


@dataclass
class ParallelState:
    world_size: int = 1
    rank: int = 0
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: Optional[object] = None
    pp_group: Optional[object] = None
    dp_group: Optional[object] = None
    mp_group: Optional[object] = None  # TP x PP: ranks holding one full model replica
    embedding_group: Optional[object] = None  # first and last stage of this pipeline
    tp_ranks: List[int] = field(default_factory=lambda: [0])
    pp_ranks: List[int] = field(default_factory=lambda: [0])
    dp_ranks: List[int] = field(default_factory=lambda: [0])
    embedding_ranks: List[int] = field(default_factory=lambda: [0])
    # Interleaved pipelining: model chunks per stage (None without it). Which chunk is running is
    # the schedule's own state, passed to the calls that depend on it.
    virtual_pp_size: Optional[int] = None
    backend: str = "gloo"
    device_type: Optional[str] = None  # "cuda" | "cpu"; None: cuda with nccl, else cpu

    # ---- pipeline position -------------------------------------------------
    def is_pipeline_first_stage(self, chunk: Optional[int] = None) -> bool:
        """First pipeline rank; with ``chunk``, also the first virtual stage (chunk 0 of it)."""
        if chunk is not None and self.virtual_pp_size is not None and chunk != 0:
            return False
        return self.pp_rank == 0

    def is_pipeline_last_stage(self, chunk: Optional[int] = None) -> bool:
        """Last pipeline rank; with ``chunk``, also the last virtual stage (its last chunk)."""
        if chunk is not None and self.virtual_pp_size is not None and chunk != self.virtual_pp_size - 1:
            return False
        return self.pp_rank == self.pp_size - 1

    @property
    def pp_next_rank(self) -> int:
        return self.pp_ranks[(self.pp_rank + 1) % self.pp_size]

    @property
    def pp_prev_rank(self) -> int:
        return self.pp_ranks[(self.pp_rank - 1) % self.pp_size]

    @property
    def tp_src_rank(self) -> int:
        """Global rank of TP rank 0 in this TP group (the broadcaster of batches)."""
        return self.tp_ranks[0]

    @property
    def is_logging_rank(self) -> bool:
        """The rank that holds the loss: last stage, first TP and DP rank."""
        return self.is_pipeline_last_stage() and self.tp_rank == 0 and self.dp_rank == 0

    @property
    def device(self) -> torch.device:
        """Chosen apart from the backend: gloo can run on CUDA tensors too (inference on one GPU)."""
        kind = self.device_type or ("cuda" if self.backend == "nccl" else "cpu")
        if kind == "cuda" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


_STATE: Optional[ParallelState] = None


def rank_grid(world_size: int, tp: int, pp: int, dp: int) -> torch.Tensor:
    """Global ranks as a [pp, dp, tp] grid (Megatron order: tp fastest, then dp, then pp)."""
    if tp < 1 or pp < 1 or dp < 1:
        raise ParallelConfigError(f"parallel sizes must be >= 1, got TP={tp} PP={pp} DP={dp}")
    if tp * pp * dp != world_size:
        raise ParallelConfigError(
            f"world size {world_size} is not --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp}) x data-parallel size ({dp}) = {tp * pp * dp}; "
            "launch TP x PP x DP processes or change the sizes"
        )
    return torch.arange(world_size).view(pp, dp, tp)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROUND_COUNTER_KEY = "megatron_lite/worker_starts"


def elastic_round_store(timeout: datetime.timedelta):
    """Under torchrun's agent store, a store prefix that every worker of this start of the group shares.

    torch's own prefix is ``/worker/attempt_{TORCHELASTIC_RESTART_COUNT}``, but that count is each
    agent's own: the agent whose worker failed counts the restart, an agent restarted only because its
    peer re-joined the rendezvous does not. After a restart on several nodes the new workers therefore
    split over two prefixes, one of which still holds the dead workers' gloo addresses (torch
    2.13; seen as ``connectFullMesh ... Connection refused`` and then a hang). Here every worker adds 1
    to a counter in the agent store (which outlives the workers) once per process: the k-th group of
    WORLD_SIZE starts is round k, the same number on every node, and the round's keys are its own.
    None when not under torchrun's agent store (plain env:// then)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world == 1:
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                           timeout=timeout)
    round_index = (client.add(ROUND_COUNTER_KEY, 1) - 1) // world
    os.environ["MEGATRON_LITE_GROUP_ROUND"] = str(round_index)
    return dist.PrefixStore(f"/megatron_lite/round_{round_index}", client)


def init_distributed(backend: Optional[str] = None, timeout_minutes: float = 10.0) -> str:
    """Initialise torch.distributed from torchrun's environment, or as a 1-process group.

    Plain ``python -m ...`` (no RANK/WORLD_SIZE) gets a single-rank group on a free local port,
    so the same code path serves one process and many.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if dist.is_initialized():
        return dist.get_backend()
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ["RANK"] = "0"
        os.environ["WORLD_SIZE"] = "1"
        os.environ.setdefault("LOCAL_RANK", "0")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ParallelConfigError("--distributed-backend nccl needs CUDA, and no CUDA device is available; "
                                      "use --distributed-backend gloo")
        local_rank, devices = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= devices:
            raise ParallelConfigError(f"LOCAL_RANK {local_rank} but this node has {devices} CUDA device(s); "
                                      f"launch at most {devices} processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    try:
        store = elastic_round_store(timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    except (RuntimeError, ValueError) as e:  # DistNetworkError / DistStoreError are RuntimeErrors
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ParallelConfigError(
            f"could not start torch.distributed (backend {backend}, rank {os.environ.get('RANK')} of "
            f"{os.environ.get('WORLD_SIZE')}, rendezvous {where}): {detail}; check that the port is free "
            "and every rank was launched (torchrun --master_port / --nproc_per_node)") from None
    return backend


def initialize_parallel(tensor: int = 1, pipeline: int = 1, data: Optional[int] = None,
                        backend: Optional[str] = None, virtual_pipeline: Optional[int] = None,
                        timeout_minutes: float = 10.0) -> ParallelState:
    """Build every process group from one rank grid and make the result the current state.

    ``data=None`` takes DP = world // (TP * PP). Every rank must call this with the same sizes:
    ``dist.new_group`` is collective over the whole world.
    """
    global _STATE
    backend = init_distributed(backend, timeout_minutes)
    world, rank = dist.get_world_size(), dist.get_rank()
    if data is None:
        if world % (tensor * pipeline) != 0:
            raise ParallelConfigError(
                f"world size {world} is not divisible by --tensor-model-parallel-size ({tensor}) x "
                f"--pipeline-model-parallel-size ({pipeline})")
        data = world // (tensor * pipeline)
    grid = rank_grid(world, tensor, pipeline, data)
    timeout = datetime.timedelta(minutes=timeout_minutes)

    def groups_along(ranks_lists):
        mine = None
        for ranks in ranks_lists:
            g = dist.new_group(ranks, backend=backend, timeout=timeout)
            if rank in ranks:
                mine = (g, ranks)
        return mine

    tp_lists = [grid[p, d, :].tolist() for p in range(pipeline) for d in range(data)]
    dp_lists = [grid[p, :, t].tolist() for p in range(pipeline) for t in range(tensor)]
    pp_lists = [grid[:, d, t].tolist() for d in range(data) for t in range(tensor)]
    mp_lists = [grid[:, d, :].flatten().tolist() for d in range(data)]
    emb_lists = [sorted({pl[0], pl[-1]}) for pl in pp_lists]

    tp_group, tp_ranks = groups_along(tp_lists)
    dp_group, dp_ranks = groups_along(dp_lists)
    pp_group, pp_ranks = groups_along(pp_lists)
    mp_group, _ = groups_along(mp_lists)
    emb = groups_along(emb_lists)
    emb_group, emb_ranks = emb if emb is not None else (None, [])

    pp_rank, dp_rank, tp_rank = [int(x) for x in (grid == rank).nonzero()[0]]
    _STATE = ParallelState(
        world_size=world, rank=rank, tp_size=tensor, pp_size=pipeline, dp_size=data,
        tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank,
        tp_group=tp_group, pp_group=pp_group, dp_group=dp_group, mp_group=mp_group,
        embedding_group=emb_group, tp_ranks=tp_ranks, pp_ranks=pp_ranks, dp_ranks=dp_ranks,
        embedding_ranks=emb_ranks, virtual_pp_size=virtual_pipeline, backend=backend,
    )
    return _STATE


def require_state(pstate: Optional[ParallelState]) -> ParallelState:
    """``pstate`` itself; code below the trainer never falls back to a process-global state."""
    if pstate is None:
        raise TypeError("pass the ParallelState explicitly (pstate=...); there is no implicit current state "
                        "below the trainer")
    return pstate


def get_parallel_state() -> ParallelState:
    """The current state; a trivial single-rank one when nothing was initialised."""
    global _STATE
    if _STATE is None:
        _STATE = ParallelState()
    return _STATE


def set_parallel_state(state: Optional[ParallelState]) -> None:
    global _STATE
    _STATE = state


def destroy_parallel() -> None:
    """Forget the groups and tear down torch.distributed (tests call this between layouts)."""
    global _STATE
    _STATE = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
