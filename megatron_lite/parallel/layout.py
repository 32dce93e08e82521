"""The layout rules, written once and torch-free: data-parallel size from the world size, which
layers each pipeline stage (and virtual stage) holds, and whether a split is possible.

``config.validate`` calls these before any process group exists (so a bad layout fails with one
line naming the flags); the model builder and the parallel state call the same functions, so the
check and the construction cannot disagree.
"""
from __future__ import annotations

from typing import Optional, Tuple

from megatron_lite.errors import ConfigError


def data_parallel_size(world_size: int, tp: int, pp: int) -> int:
    """DP = world / (TP x PP); refuses a world size that is not a multiple of TP x PP."""
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp}); launch a multiple of {tp * pp} processes")
    return world_size // (tp * pp)


def check_backend_device(backend: Optional[str]) -> None:
    """nccl runs on CUDA devices only."""
    if backend == "nccl":
        import torch  # lazily: the flag-only paths stay importable without torch
        if not torch.cuda.is_available():
            raise ConfigError("--distributed-backend nccl needs CUDA, and no CUDA device is available; "
                              "use --distributed-backend gloo (the default without CUDA)")


def _uneven_split_ok(num_layers: int, pp: int, first: Optional[int], last: Optional[int]) -> bool:
    middle_layers = num_layers - (first or 0) - (last or 0)
    middle_stages = pp - (first is not None) - (last is not None)
    if middle_layers < 0:
        return False
    if middle_stages == 0:
        return middle_layers == 0
    return middle_stages > 0 and middle_layers % middle_stages == 0


def check_pipeline_split(num_layers: int, pp: int, first: Optional[int] = None, last: Optional[int] = None,
                         layers_per_virtual_stage: Optional[int] = None) -> None:
    """Can ``num_layers`` be split over ``pp`` stages (uneven first/last, or interleaved chunks)?"""
    if pp == 1:
        if layers_per_virtual_stage is not None:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        if first is not None or last is not None:
            raise ConfigError("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
        return
    if not _uneven_split_ok(num_layers, pp, first, last):
        raise ConfigError(
            f"--num-layers ({num_layers}) cannot be split evenly over --pipeline-model-parallel-size "
            f"({pp}) stages" + (f" with --decoder-first-pipeline-num-layers {first}" if first else "")
            + (f" and --decoder-last-pipeline-num-layers {last}" if last else ""))
    vp = layers_per_virtual_stage
    if vp is None:
        return
    if first is not None or last is not None:
        raise ConfigError("--num-layers-per-virtual-pipeline-stage cannot be combined with uneven "
                          "--decoder-first/last-pipeline-num-layers")
    per_stage = num_layers // pp
    if vp < 1 or per_stage % vp != 0:
        raise ConfigError(f"--num-layers ({num_layers}) / --pipeline-model-parallel-size ({pp}) must be "
                          f"divisible by --num-layers-per-virtual-pipeline-stage ({vp})")
    if per_stage // vp < 2:
        raise ConfigError(
            f"--num-layers-per-virtual-pipeline-stage ({vp}) leaves one model chunk per stage "
            f"({per_stage} layers per stage): interleaving needs at least two; use a smaller "
            "value, or drop the flag for plain 1F1B")


def virtual_pipeline_size(num_layers: int, pp: int, layers_per_virtual_stage: Optional[int]) -> Optional[int]:
    """Model chunks per stage under interleaving (None without it)."""
    if layers_per_virtual_stage is None or pp == 1:
        return None
    return (num_layers // pp) // layers_per_virtual_stage


def layers_for_stage(num_layers: int, pp_size: int, pp_rank: int, first: Optional[int] = None,
                     last: Optional[int] = None, vp_size: Optional[int] = None,
                     vp_rank: int = 0) -> Tuple[int, int]:
    """(global index of the first layer, number of layers) held by pipeline rank ``pp_rank``
    (model chunk ``vp_rank`` of ``vp_size`` with interleaving), as Megatron-LM splits them.

    Even: L / pp layers per stage. Uneven: --decoder-first/last-pipeline-num-layers on the first/
    last stage, the rest split evenly over the middle stages. Interleaved: chunk v of stage p holds
    layers_per_chunk = L / (pp * vp) layers starting at v * (L / vp) + p * layers_per_chunk, so
    the chunks go round the stages in order (8 layers, pp 2, vp 2: [0,1] [4,5] | [2,3] [6,7]).
    """
    if not 0 <= pp_rank < pp_size:
        raise ConfigError(f"pipeline rank {pp_rank} is outside 0..{pp_size - 1}")
    if vp_size is not None:
        if first is not None or last is not None:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage cannot be combined with uneven "
                              "--decoder-first/last-pipeline-num-layers")
        if not 0 <= vp_rank < vp_size or num_layers % (pp_size * vp_size) != 0:
            raise ConfigError(f"cannot split {num_layers} layers into {pp_size} stages x {vp_size} chunks "
                              f"(chunk {vp_rank})")
        per_chunk = num_layers // (pp_size * vp_size)
        return vp_rank * (num_layers // vp_size) + pp_rank * per_chunk, per_chunk
    if pp_size == 1:
        return 0, num_layers
    check_pipeline_split(num_layers, pp_size, first, last)
    if pp_rank == 0 and first is not None:
        return 0, first
    if pp_rank == pp_size - 1 and last is not None:
        return num_layers - last, last
    middle_stages = pp_size - (first is not None) - (last is not None)
    per_stage = (num_layers - (first or 0) - (last or 0)) // middle_stages
    return (first or 0) + (pp_rank - (first is not None)) * per_stage, per_stage
