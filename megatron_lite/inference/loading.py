"""A model for evaluation or generation, built from a checkpoint's own saved config.

    model = load_for_inference("work_dirs/run/checkpoints")   # under torchrun with TP x PP ranks
    model.chunks, model.cfg, model.pstate, model.iteration

The layout (TP, PP, virtual stages) is the one the checkpoint was saved with; the process count
must be TP x PP. The device is chosen apart from the backend: gloo on CPU by default, nccl with
``device="cuda"``. Dropout is off.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from megatron_lite.config import Config, pad_vocab_size
from megatron_lite.errors import CheckpointError, ParallelConfigError
from megatron_lite.parallel.state import ParallelState, initialize_parallel


@dataclass
class InferenceModel:
    chunks: List[torch.nn.Module]
    cfg: Config
    pstate: ParallelState
    iteration: int


def saved_config(load_dir: str) -> Config:
    """The Config a checkpoint directory was trained with (read from its first shard)."""
    from megatron_lite.training.checkpoint import read_checkpoint_args

    return Config.from_dict(read_checkpoint_args(load_dir))


def load_for_inference(load_dir: str, device: Optional[str] = None, vocab_size: Optional[int] = None,
                       timeout_minutes: float = 10.0, cfg: Optional[Config] = None) -> InferenceModel:
    """Build this rank's chunks at the saved layout and load their weights (no optimizer, no RNG).
    ``cfg``: the checkpoint's ``saved_config`` when the caller has read it already (it is not reread)."""
    from megatron_lite.model.gpt import build_model_chunks
    from megatron_lite.parallel.random import model_parallel_seed
    from megatron_lite.training.checkpoint import load_checkpoint

    cfg = saved_config(load_dir) if cfg is None else cfg
    m, par = cfg.model, cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp * pp:
        raise ParallelConfigError(f"--load {load_dir} was saved with TP={tp} PP={pp}: run with "
                                  f"{tp * pp} processes (torchrun --nproc_per_node {tp * pp}), got {world}")
    device = device or "cpu"
    if device not in ("cpu", "cuda"):
        raise ParallelConfigError(f"device {device!r}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ParallelConfigError("device cuda: no CUDA device is available; use cpu")
    pstate = initialize_parallel(tp, pp, 1, backend="nccl" if device == "cuda" else "gloo",
                                 virtual_pipeline=cfg.virtual_pipeline_size(), timeout_minutes=timeout_minutes)
    pstate.device_type = device
    m.hidden_dropout = m.attention_dropout = 0.0
    # Decoding feeds one position at a time, which cannot be split over TP ranks; neither changes weights.
    m.sequence_parallel = False
    m.recompute_granularity = None
    if m.padded_vocab_size is None:
        if m.vocab_size is None and vocab_size is None:
            raise CheckpointError(f"--load {load_dir}: the saved config has no vocabulary size")
        m.padded_vocab_size = pad_vocab_size(m.vocab_size or vocab_size, m.make_vocab_size_divisible_by, tp)
    model_parallel_seed(cfg.train.seed, pstate)
    chunks = [c.to(pstate.device) for c in build_model_chunks(cfg, pstate)]
    info = load_checkpoint(load_dir, chunks, pstate=pstate, load_optim=False, load_rng=False)
    for c in chunks:
        c.eval()
    return InferenceModel(chunks, cfg, pstate, info["iteration"])


def load_with_tokenizer(load_dir: str, vocab_file: Optional[str] = None, merge_file: Optional[str] = None,
                        device: Optional[str] = None):
    """(InferenceModel, tokenizer) for a tool: the tokenizer the checkpoint was trained with unless
    ``vocab_file``/``merge_file`` override it."""
    from megatron_lite.data.tokenizer import build_tokenizer

    cfg = saved_config(load_dir)
    d, m = cfg.data, cfg.model
    tok = build_tokenizer(d.tokenizer_type, vocab_file or d.vocab_file, merge_file or d.merge_file,
                          d.tokenizer_model, m.vocab_size)
    return load_for_inference(load_dir, device=device, vocab_size=tok.vocab_size, cfg=cfg), tok
