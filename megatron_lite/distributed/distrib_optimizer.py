"""ZeRO-1: each data-parallel rank keeps the fp32 master weights and Adam moments of its own slice
of every gradient bucket (Megatron-LM's ``DistributedOptimizer``).

The model chunks are ``DistributedDataParallel`` wrappers built with ``use_distributed_optimizer``:
their buckets are padded so that DP rank r owns elements [r*n/DP, (r+1)*n/DP) of each, their
gradient reduction is a reduce-scatter into that slice, and each parameter's data lives in a flat
parameter buffer. For every parameter overlapping the owned slice this optimizer holds one "shard":
the overlapping element range, an fp32 main tensor over it (a view of the model's own fp32 data,
or an fp32 copy of bf16/fp16 data), and the matching view of the reduced gradient.

One step: unscale and look for inf/nan (fp16), the global grad norm and clipping, AdamW on the
shards, copy back into the model's slice (half precision), all-gather every bucket's parameters
(asynchronously with ``overlap_param_gather``: the model waits bucket by bucket in its next
forward). Statistics are summed over all ranks (``across_dp``): each element is owned by exactly
one DP rank, and the usual rules drop TP and tied-embedding duplicates, so the norm, the zero
count and the skip decision are those of the unsharded optimizer.

Checkpoints: ``state_dict`` is what every DP rank shares (hyperparameters, loss scaler), saved in
the model file; ``sharded_state_dict`` is this rank's slices, saved by every DP rank beside it
(``distrib_optim_{dp_rank:03d}.pt``). Loading assembles the owned ranges from whichever saved
slices overlap them, so a checkpoint saved at one DP size loads at another.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from megatron_lite.errors import CheckpointError
from megatron_lite.optim.optimizer import MegatronOptimizer, build_adamw
from megatron_lite.parallel.params import copy_parallel_attributes

ADAM_STATE = ("exp_avg", "exp_avg_sq")
# Restored from a checkpoint; implementation switches (fused, foreach) stay this run's own.
HYPERPARAMETERS = ("lr", "initial_lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


@dataclass
class Shard:
    """The part of one model parameter this DP rank owns."""
    index: int  # the parameter's position in the optimizer's parameter order (same on every DP rank)
    param: torch.nn.Parameter
    lo: int  # [lo, hi) in the parameter's flattened elements
    hi: int
    main: torch.nn.Parameter  # fp32, what AdamW updates
    grad: torch.Tensor  # view of the reduced gradient over [lo, hi)
    model_view: torch.Tensor  # view of the model parameter's data over [lo, hi)


def owned_shards(model_chunks, param_groups, pstate, mixed: bool) -> List[List[Shard]]:
    """Per optimizer group, the shards of the parameters whose buffer range meets this rank's slice."""
    where = {}
    for chunk in model_chunks:
        for buf in chunk.grad_buffers:
            for bucket in buf.buckets:
                lo, hi = bucket.shard_range(pstate.dp_rank, pstate.dp_size)
                for p in bucket.params:
                    where[id(p)] = (buf.param_range(p), (bucket.start + lo, bucket.start + hi))
    out, index = [], 0
    for group in param_groups:
        shards = []
        for p in group["params"]:
            (start, end), (own_lo, own_hi) = where[id(p)]
            lo, hi = max(start, own_lo) - start, min(end, own_hi) - start
            if lo < hi:
                model_view = p.data.view(-1)[lo:hi]
                # fp32 model: AdamW updates the model's own data (a view); else an fp32 master copy.
                main = torch.nn.Parameter(model_view.detach().clone().float() if mixed else model_view)
                copy_parallel_attributes(p, main)
                shards.append(Shard(index, p, lo, hi, main, p.main_grad.view(-1)[lo:hi], model_view))
            index += 1
        out.append(shards)
    return out


class DistributedOptimizer(MegatronOptimizer):
    across_dp = True

    def __init__(self, model_chunks, param_groups: List[Dict], optim_cfg, pstate, grad_scaler=None,
                 mixed: bool = False, log_num_zeros: bool = False, overlap_param_gather: bool = False):
        for chunk in model_chunks:
            if not getattr(getattr(chunk, "ddp_config", None), "use_distributed_optimizer", False):
                raise ValueError("the distributed optimizer needs model chunks wrapped in DistributedDataParallel "
                                 "with use_distributed_optimizer=True")
        self.model_chunks = list(model_chunks)
        self.mixed = mixed
        self.overlap_param_gather = overlap_param_gather
        self.num_params = sum(len(g["params"]) for g in param_groups)
        self.shards = owned_shards(model_chunks, param_groups, pstate, mixed)
        groups = [{**g, "params": [s.main for s in shards]} for g, shards in zip(param_groups, self.shards)]
        optimizer, name = build_adamw(groups, optim_cfg, pstate.device)
        super().__init__(optimizer, optim_cfg.clip_grad, pstate, log_num_zeros, grad_scaler,
                         name + ", ZeRO-1 over %d DP ranks" % pstate.dp_size)

    def _all_shards(self):
        for shards in self.shards:
            yield from shards

    def _separate_main_params(self) -> bool:
        return self.mixed

    def _prepare_grads(self) -> None:
        for s in self._all_shards():
            s.main.grad = s.grad if s.grad.dtype == torch.float32 else s.grad.float()

    def _finish_step(self) -> None:
        if self.mixed:
            with torch.no_grad():
                for s in self._all_shards():
                    s.model_view.copy_(s.main)
        for chunk in self.model_chunks:
            chunk.start_param_sync(async_op=self.overlap_param_gather)

    def finish_param_sync(self) -> None:
        for chunk in self.model_chunks:
            chunk.finish_param_sync()

    def reload_model_params(self) -> None:
        """The model's weights were loaded: rebuild the fp32 slices from them."""
        if self.mixed:
            with torch.no_grad():
                for s in self._all_shards():
                    s.main.copy_(s.model_view.float())

    # ---- checkpoints ----------------------------------------------------------------------------
    def _load_shard(self, s: Shard, entries: List[dict], step_device) -> None:
        if entries and entries[0]["numel"] != s.param.numel():
            raise CheckpointError(f"optimizer parameter {s.index} has {entries[0]['numel']} elements in "
                                  f"the checkpoint, {s.param.numel()} in this model")
        if entries and all("step" in e for e in entries):
            st = {"step": entries[0]["step"].clone().to(step_device)}
            for key in ADAM_STATE:
                st[key] = _assemble(entries, key, s.lo, s.hi, s.index).to(s.main.device)
            self.optimizer.state[s.main] = st
        else:
            self.optimizer.state.pop(s.main, None)  # saved before the first step
        if self.mixed:
            s.main.copy_(_assemble(entries, "master", s.lo, s.hi, s.index))

    def state_dict(self) -> dict:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        state = {"distributed": {"dp_size": self.pstate.dp_size, "num_params": self.num_params},
                 "param_groups": groups}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def sharded_state_dict(self) -> dict:
        shards = []
        for s in self._all_shards():
            entry = {"index": s.index, "lo": s.lo, "hi": s.hi, "numel": s.param.numel()}
            st = self.optimizer.state.get(s.main, {})
            for key in ("step",) + ADAM_STATE:
                if key in st:
                    entry[key] = st[key].detach().clone()
            if self.mixed:
                entry["master"] = s.main.detach().clone()
            shards.append(entry)
        return {"dp_rank": self.pstate.dp_rank, "dp_size": self.pstate.dp_size, "shards": shards}

    def load_state_dict(self, state: dict, sharded: Optional[Sequence[dict]] = None) -> None:
        """``state``: the common part; ``sharded``: every saved DP rank's ``sharded_state_dict``. A
        whole-tensor optimizer state (saved without ZeRO-1, or by tools/checkpoint_convert.py) is cut
        into this rank's slices instead."""
        if "distributed" not in state:
            state, sharded = _whole_as_slices(state, self.num_params)
        if state["distributed"].get("num_params") != self.num_params:
            raise CheckpointError(f"the checkpoint's optimizer has {state['distributed'].get('num_params')} "
                                  f"parameters, this model {self.num_params}")
        if not sharded:
            raise CheckpointError("the distributed optimizer's shards (distrib_optim_*.pt) are missing")
        pieces: Dict[int, List[dict]] = {}
        for saved in sharded:
            for entry in saved["shards"]:
                pieces.setdefault(int(entry["index"]), []).append(entry)
        for group, saved_group in zip(self.optimizer.param_groups, state["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k in HYPERPARAMETERS})
        with torch.no_grad():
            for group, shards in zip(self.optimizer.param_groups, self.shards):
                # torch keeps "step" on the device for its fused kernel, on the CPU otherwise
                step_device = shards[0].main.device if shards and group.get("fused") else "cpu"
                for s in shards:
                    self._load_shard(s, pieces.get(s.index, []), step_device)
        if self.grad_scaler is not None and "grad_scaler" in state:
            self.grad_scaler.load_state_dict(state["grad_scaler"])


def _whole_as_slices(state: dict, num_params: int):
    """A FP32Optimizer / MixedPrecisionOptimizer state dict as one 'DP rank' holding every element."""
    torch_state = state["optimizer"]
    masters = [m for group in state.get("fp32_from_fp16_params", []) for m in group]
    count = sum(len(g["params"]) for g in torch_state["param_groups"])
    if count != num_params:
        raise CheckpointError(f"the checkpoint's optimizer has {count} parameters, this model {num_params}")
    entries = []
    for index in range(count):
        st = torch_state["state"].get(index, torch_state["state"].get(str(index), {}))
        numel = masters[index].numel() if masters else (st["exp_avg"].numel() if st else 0)
        entry = {"index": index, "lo": 0, "hi": numel, "numel": numel}
        if st:
            entry.update(step=st["step"], exp_avg=st["exp_avg"].reshape(-1), exp_avg_sq=st["exp_avg_sq"].reshape(-1))
        if masters:
            entry["master"] = masters[index].reshape(-1)
        if st or masters:
            entries.append(entry)
    common = {"distributed": {"dp_size": 1, "num_params": num_params},
              "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in torch_state["param_groups"]]}
    if "grad_scaler" in state:
        common["grad_scaler"] = state["grad_scaler"]
    return common, [{"dp_rank": 0, "dp_size": 1, "shards": entries}]


def _assemble(entries: List[dict], key: str, lo: int, hi: int, index: int) -> torch.Tensor:
    """Elements [lo, hi) of one parameter's ``key`` state, from the saved slices that overlap them."""
    out = torch.empty(hi - lo, dtype=torch.float32)
    covered = 0
    for e in entries:
        a, b = max(lo, int(e["lo"])), min(hi, int(e["hi"]))
        if a < b:
            out[a - lo:b - lo] = e[key][a - int(e["lo"]):b - int(e["lo"])]
            covered += b - a
    if covered != hi - lo:
        raise CheckpointError(f"the saved optimizer slices cover {covered} of elements [{lo}, {hi}) of parameter "
                              f"{index}; a distrib_optim_*.pt file is missing")
    return out
