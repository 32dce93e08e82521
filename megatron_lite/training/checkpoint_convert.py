"""Resharding checkpoints between TP x PP x VP layouts, and to / from HuggingFace GPT-2.

The source side reads only what the checkpoint says about itself (``param_meta``, see
``checkpoint_format``): each global tensor is rebuilt by concatenating its TP shards along the
recorded dimension and cutting the vocabulary padding off. The target side builds the target
rank's model chunks from the saved config (so names, shapes and the optimizer's parameter order
are exactly what training at that layout expects), and fills each tensor by re-padding the
vocabulary for the target TP and taking the rank's slice. The padding rows of the vocabulary are kept where the target has them
(they enter the softmax), zero-filled where it has more, dropped for HuggingFace. Source files are memory-mapped and
tensors are handled one at a time: beyond the target shard being written, at most one full
tensor is held.

Optimizer state (``with_optim``): Adam moments and fp32 masters go through the same path (from
whole-tensor or ZeRO-1 slice files alike) and are written in the whole-tensor format, which
loads with or without ``--use-distributed-optimizer`` at any DP size.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from megatron_lite.config import Config, pad_vocab_size
from megatron_lite.errors import CheckpointError
from megatron_lite.io_utils import atomic_path, atomic_write_text
from megatron_lite.training import checkpoint as ckpt
from megatron_lite.training.checkpoint_format import describe_params, model_keys, optimizer_param_names

ADAM = ("exp_avg", "exp_avg_sq")


def _load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any failure means the same to the user
        raise CheckpointError(f"{path}: not a readable checkpoint file (corrupt or truncated)") from None


@dataclass
class Source:
    """A saved checkpoint, read lazily: one memory-mapped file per (TP, PP) rank."""
    root: str
    iteration: int
    args: dict
    tp: int
    pp: int
    files: Dict[Tuple[int, int], str]
    _states: Dict[Tuple[int, int], dict] = field(default_factory=dict)
    _slices: Dict[Tuple[int, int], Dict[int, List[dict]]] = field(default_factory=dict)
    _indices: Dict[Tuple[int, int], Dict[Tuple[str, str], int]] = field(default_factory=dict)
    where: Dict[str, Tuple[int, str, str, dict]] = field(default_factory=dict)  # global -> (pp, key, local, meta)

    @classmethod
    def open(cls, root: str, iteration: Optional[int] = None) -> "Source":
        if iteration is None:
            iteration = ckpt.read_latest_iteration(root)
            if iteration is None:
                raise CheckpointError(f"{root}: no {ckpt.TRACKER_FILE}; give the directory that --save wrote")
        first = _load(_any_shard(root, iteration))
        layout = first.get("layout") or {}
        tp, pp = layout.get("tensor_model_parallel_size"), layout.get("pipeline_model_parallel_size")
        if not tp or not pp or "param_meta" not in first:
            raise CheckpointError(f"{root}: the checkpoint does not describe its tensors (saved by an older "
                                  "megatron_lite); load it and save it again to convert it")
        files = {(t, p): ckpt.checkpoint_file(root, iteration, t, p, pp) for t in range(tp) for p in range(pp)}
        for path in files.values():
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: missing; the checkpoint is incomplete (TP={tp}, PP={pp})")
        src = cls(root, iteration, first["args"], tp, pp, files)
        for p in range(pp):
            for key, entries in src.state(0, p)["param_meta"].items():
                for local, meta in entries.items():
                    if not meta["tied_copy"]:
                        src.where.setdefault(meta["global_name"], (p, key, local, meta))
        return src

    def state(self, tp_rank: int, pp_rank: int) -> dict:
        if (tp_rank, pp_rank) not in self._states:
            self._states[(tp_rank, pp_rank)] = _load(self.files[(tp_rank, pp_rank)])
        return self._states[(tp_rank, pp_rank)]

    @property
    def vocab_size(self) -> int:
        return int(self.args["model"]["vocab_size"])

    @property
    def has_optimizer(self) -> bool:
        return "optimizer" in self.state(0, 0)

    @property
    def consumed_samples(self) -> int:
        return int(self.state(0, 0).get("consumed_train_samples", 0))

    def scheduler_state(self) -> Optional[dict]:
        return self.state(0, 0).get("opt_param_scheduler")

    # ---- one global tensor ----------------------------------------------------------------------
    def full(self, global_name: str, kind: str = "weight", unpad: bool = False) -> torch.Tensor:
        """The whole tensor: the weight, or its 'exp_avg' / 'exp_avg_sq' / 'master'. The vocabulary keeps
        its padding rows (they enter the softmax, so a round trip must keep them) unless ``unpad``."""
        if global_name not in self.where:
            raise CheckpointError(f"{self.root}: the checkpoint has no tensor {global_name!r}")
        p, key, local, meta = self.where[global_name]
        ranks = range(self.tp) if meta["tp_dim"] is not None else [0]
        parts = [self._local(t, p, key, local, kind) for t in ranks]
        whole = torch.cat(parts, dim=meta["tp_dim"]) if len(parts) > 1 else parts[0]
        return whole[: self.vocab_size] if meta["vocab_padded"] and unpad else whole

    def step(self) -> Optional[torch.Tensor]:
        """Adam's step count (the same for every parameter), or None before the first step."""
        opt = self.state(0, 0)["optimizer"]
        if "distributed" in opt:
            for entries in self._slices_of(0, 0).values():
                if "step" in entries[0]:
                    return entries[0]["step"]
            return None
        for st in opt["optimizer"]["state"].values():
            return st["step"]
        return None

    def _local(self, t: int, p: int, key: str, local: str, kind: str) -> torch.Tensor:
        state = self.state(t, p)
        weight = state[key][local]
        if kind == "weight":
            return weight
        index = self._optimizer_index(t, p)[(key, local)]
        opt = state["optimizer"]
        if "distributed" in opt:
            entries = self._slices_of(t, p).get(index, [])
            if kind == "master" and not (entries and "master" in entries[0]):
                return weight.float()  # an fp32 model's masters are its weights
            from megatron_lite.distributed.distrib_optimizer import _assemble  # the loader's own rule
            return _assemble(entries, kind, 0, weight.numel(), index).view(weight.shape)
        if kind == "master":
            masters = opt.get("fp32_from_fp16_params")
            if masters is None:
                return weight.float()
            return [m for group in masters for m in group][index]
        return opt["optimizer"]["state"][index][kind]

    def _optimizer_index(self, t: int, p: int) -> Dict[Tuple[str, str], int]:
        """(model key, tensor name) -> optimizer index of one rank's file (built once per file)."""
        if (t, p) not in self._indices:
            self._indices[(t, p)] = {(k, n): i for i, (k, n) in enumerate(self.state(t, p)["optimizer_params"])}
        return self._indices[(t, p)]

    def _slices_of(self, t: int, p: int) -> Dict[int, List[dict]]:
        if (t, p) not in self._slices:
            opt = self.state(t, p)["optimizer"]
            model_file = self.files[(t, p)]
            pieces: Dict[int, List[dict]] = {}
            for saved in ckpt._read_optimizer_slices(model_file, int(opt["distributed"]["dp_size"])):
                for entry in saved["shards"]:
                    pieces.setdefault(int(entry["index"]), []).append(entry)
            self._slices[(t, p)] = pieces
        return self._slices[(t, p)]


@dataclass
class TensorSource:
    """Whole tensors already in memory (an imported HuggingFace model), at iteration 0."""
    args: dict
    tensors: Dict[str, torch.Tensor]
    root: str = "<memory>"
    iteration: int = 0
    consumed_samples: int = 0
    has_optimizer: bool = False

    def full(self, global_name: str, kind: str = "weight", unpad: bool = False) -> torch.Tensor:
        if global_name not in self.tensors:
            raise CheckpointError(f"{self.root}: no tensor for {global_name!r}")
        return self.tensors[global_name]

    def scheduler_state(self) -> Optional[dict]:
        return None


def _any_shard(root: str, iteration: int) -> str:
    d = ckpt.checkpoint_dir(root, iteration)
    shards = sorted(x for x in (os.listdir(d) if os.path.isdir(d) else []) if x.startswith("mp_rank_"))
    if not shards:
        raise CheckpointError(f"{root}: {d} holds no mp_rank_* shard")
    return os.path.join(d, shards[0], "model_optim_rng.pt")


# ---- the target -------------------------------------------------------------------------------------
def target_config(args: dict, tp: int, pp: int, layers_per_virtual_stage: Optional[int]) -> Config:
    cfg = Config.from_dict(copy.deepcopy(args))
    par = cfg.parallel
    par.tensor_model_parallel_size, par.pipeline_model_parallel_size = tp, pp
    par.num_layers_per_virtual_pipeline_stage = layers_per_virtual_stage
    par.decoder_first_pipeline_num_layers = par.decoder_last_pipeline_num_layers = None
    par.pipeline_schedule = None
    par.use_distributed_optimizer = False  # the whole-tensor optimizer format loads either way
    m = cfg.model
    m.padded_vocab_size = pad_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
    try:
        m.check(tp)
        par.check(tp * pp, m.num_layers)
    except Exception as e:  # noqa: BLE001 - a ConfigError naming the flag
        raise CheckpointError(f"cannot convert to TP={tp} PP={pp}: {e}") from None
    return cfg


def _rank_state(tp_rank: int, pp_rank: int, cfg: Config):
    from megatron_lite.model.gpt import build_model_chunks
    from megatron_lite.parallel.state import ParallelState

    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    ps = ParallelState(world_size=tp * pp, rank=tp_rank + tp * pp_rank, tp_size=tp, pp_size=pp, tp_rank=tp_rank,
                       pp_rank=pp_rank, virtual_pp_size=cfg.virtual_pipeline_size(), device_type="cpu")
    with torch.random.fork_rng():
        chunks = build_model_chunks(cfg, ps)
    return ps, chunks


def reshard(whole: torch.Tensor, meta: dict, tp_rank: int, tp: int, padded_vocab: int) -> torch.Tensor:
    """This target rank's piece of a whole tensor: the vocabulary padded (zero rows) or cut (padding
    rows only) to the target's padded size, then the TP slice."""
    if meta["vocab_padded"] and whole.shape[0] < padded_vocab:
        pad = torch.zeros((padded_vocab - whole.shape[0],) + tuple(whole.shape[1:]), dtype=whole.dtype)
        whole = torch.cat([whole, pad])
    elif meta["vocab_padded"]:
        whole = whole[:padded_vocab]
    if meta["tp_dim"] is None:
        return whole.clone()
    return whole.chunk(tp, dim=meta["tp_dim"])[tp_rank].clone()


def convert(src: Source, out_root: str, tp: int, pp: int, layers_per_virtual_stage: Optional[int] = None,
            with_optim: bool = False, log=print) -> List[str]:
    """Write ``src`` at TP x PP (x VP) under ``out_root``; returns the files written."""
    if with_optim and not src.has_optimizer:
        raise CheckpointError(f"{src.root}: the checkpoint holds no optimizer state; drop --with-optim")
    cfg = target_config(src.args, tp, pp, layers_per_virtual_stage)
    written = []
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            ps, chunks = _rank_state(tp_rank, pp_rank, cfg)
            meta = describe_params(chunks, ps)
            state = {"checkpoint_version": ckpt.CHECKPOINT_VERSION, "iteration": src.iteration,
                     "consumed_train_samples": src.consumed_samples,
                     "layout": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                                "virtual_pipeline_model_parallel_size": len(chunks)},
                     "args": cfg.to_dict(), "param_meta": meta,
                     "optimizer_params": optimizer_param_names(chunks)}
            padded = cfg.model.padded_vocab_size
            for key, chunk in zip(model_keys(len(chunks)), chunks):
                own = chunk.state_dict()
                state[key] = {local: reshard(src.full(m["global_name"]), m, tp_rank, tp, padded).to(own[local].dtype)
                              for local, m in meta[key].items()}
            if with_optim:
                state["optimizer"] = _optimizer_state(src, chunks, meta, state["optimizer_params"], tp_rank, tp,
                                                      padded, cfg)
                if src.scheduler_state() is not None:
                    state["opt_param_scheduler"] = src.scheduler_state()
            path = ckpt.checkpoint_file(out_root, src.iteration, tp_rank, pp_rank, pp)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
            written.append(path)
            log(f"> wrote {os.path.relpath(path, out_root)} ({sum(len(v) for v in meta.values())} tensors)")
    atomic_write_text(os.path.join(out_root, ckpt.TRACKER_FILE), str(src.iteration), fsync=True)
    return written


def _optimizer_state(src: Source, chunks, meta, names, tp_rank: int, tp: int, padded: int, cfg: Config) -> dict:
    """The whole-tensor optimizer format (FP32Optimizer / MixedPrecisionOptimizer) of one target rank."""
    from megatron_lite.optim.optimizer import get_param_groups

    saved = src.state(0, 0)["optimizer"]
    groups_saved = saved["param_groups"] if "distributed" in saved else saved["optimizer"]["param_groups"]
    groups = get_param_groups(chunks, cfg.optim.weight_decay)
    step = src.step()
    state, masters, param_groups, index = {}, [], [], 0
    for g, saved_g in zip(groups, groups_saved):
        ids, group_masters = [], []
        for _ in g["params"]:
            key, local = names[index]
            m = meta[key][local]
            if step is not None:
                state[index] = {"step": step.clone(), **{k: reshard(src.full(m["global_name"], k), m, tp_rank, tp,
                                                                    padded).float() for k in ADAM}}
            group_masters.append(reshard(src.full(m["global_name"], "master"), m, tp_rank, tp, padded).float())
            ids.append(index)
            index += 1
        param_groups.append({**{k: v for k, v in saved_g.items() if k != "params"}, "params": ids})
        masters.append(group_masters)
    out = {"optimizer": {"state": state, "param_groups": param_groups}}
    if cfg.model.fp16 or cfg.model.bf16:
        out["fp32_from_fp16_params"] = masters
    if "grad_scaler" in saved:
        out["grad_scaler"] = saved["grad_scaler"]
    return out
