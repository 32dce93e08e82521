"""Checkpoints in Megatron-LM's directory layout, written atomically.

    <dir>/iter_{iteration:07d}/mp_rank_{tp:02d}/model_optim_rng.pt          (PP = 1)
    <dir>/iter_{iteration:07d}/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt  (PP > 1)
    <dir>/latest_checkpointed_iteration.txt
    with --use-distributed-optimizer, beside each model file, one per DP rank:
    <dir>/iter_{iteration:07d}/mp_rank_.../distrib_optim_{dp:03d}.pt

Each model file holds the model shard(s), optimizer and scheduler state, RNG states, the
iteration and consumed-sample count, and the run's config as plain data, so it loads
with ``torch.load(weights_only=True)``. Under ZeRO-1 the model file keeps the optimizer state all DP
ranks share and each DP rank writes its own slices of the Adam moments and fp32 masters (Megatron
gathers them into one ``distrib_optim.pt`` on DP rank 0; writing in parallel needs no gather).
Loading re-cuts the slices for the DP size of the run that loads. Files are written under a temporary name and
renamed; the ``latest`` file is replaced last, so a crash mid-save leaves the previous
checkpoint as the one that loads.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.io_utils import atomic_path, atomic_write_text
from megatron_lite.training.checkpoint_format import describe_params, model_keys, optimizer_param_names
from megatron_lite.parallel.random import get_rng_tracker
from megatron_lite.parallel.state import ParallelState, require_state
from megatron_lite.errors import CheckpointError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0


STAGING_SUFFIX = ".staging"  # a save in progress: never loaded from
REPLACED_SUFFIX = ".replaced"  # the previous copy of an iteration, while a new save of it is renamed in


def checkpoint_dir(root: str, iteration: int) -> str:
    """The directory of ``iteration``; during the instant a re-save of the same iteration swaps
    directories, the previous complete copy (``.replaced``)."""
    final = os.path.join(root, f"iter_{iteration:07d}")
    if not os.path.isdir(final) and os.path.isdir(final + REPLACED_SUFFIX):
        return final + REPLACED_SUFFIX
    return final


def shard_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def checkpoint_file(root: str, iteration: int, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return os.path.join(checkpoint_dir(root, iteration), shard_name(tp_rank, pp_rank, pp_size), "model_optim_rng.pt")


def distrib_optim_file(model_file: str, dp_rank: int) -> str:
    """DP rank ``dp_rank``'s ZeRO-1 optimizer slices, beside the model file of its TP/PP rank."""
    return os.path.join(os.path.dirname(model_file), f"distrib_optim_{dp_rank:03d}.pt")


def _read_optimizer_slices(model_file: str, saved_dp: int) -> List[dict]:
    out = []
    for r in range(saved_dp):
        path = distrib_optim_file(model_file, r)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing; the checkpoint was saved with --use-distributed-optimizer at "
                                  f"data-parallel size {saved_dp} and needs all {saved_dp} optimizer files "
                                  "(or load with --no-load-optim)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - any failure means the same thing to the user
            raise CheckpointError(f"{path}: not a readable optimizer shard (corrupt or truncated); use another "
                                  "checkpoint or --no-load-optim") from None
        if not isinstance(state, dict) or not isinstance(state.get("shards"), list):
            raise CheckpointError(f"{path}: not a megatron_lite distributed-optimizer shard")
        out.append(state)
    return out


def _load_optimizer(path: str, optimizer, saved: dict) -> None:
    """Restore the optimizer, reading the per-DP-rank slices when the checkpoint has them."""
    saved_distributed = isinstance(saved, dict) and isinstance(saved.get("distributed"), dict)
    run_distributed = hasattr(optimizer, "sharded_state_dict")
    if saved_distributed and not run_distributed:
        raise CheckpointError(f"{path}: the optimizer state was saved with --use-distributed-optimizer; add the "
                              "flag (any DP size), or write it whole with tools/checkpoint_convert.py --with-optim, "
                              "or load the weights only with --no-load-optim")
    if run_distributed:
        slices = _read_optimizer_slices(path, int(saved["distributed"].get("dp_size", 0))) \
            if saved_distributed else None
        def load(st):
            try:
                optimizer.load_state_dict(st, slices)
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from None

        _restore(path, "optimizer state", load, saved)
    else:
        _restore(path, "optimizer state", optimizer.load_state_dict, saved)


def read_latest_iteration(root: str) -> Optional[int]:
    """The iteration the tracker file names; None when ``root`` (or its tracker) does not exist.
    A ``root`` that is a plain file, or a tracker that is not an iteration number, is refused."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise CheckpointError(f"--load {root}: is a file, not a checkpoint directory; give the directory "
                              "that --save wrote")
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: expected an iteration number, found bytes that are not UTF-8 text; "
                              "the tracker file is damaged (write the iteration to resume from)") from None
    if text == "release":
        return 0
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text[:40]!r}; the tracker file "
                              "is damaged (write the iteration to resume from)") from None
    if iteration < 0:
        raise CheckpointError(f"{path}: expected an iteration number >= 0, found {iteration}")
    return iteration


def read_shard(path: str) -> dict:
    """One shard's state, or a CheckpointError saying what is wrong with the file. torch.load's own
    advice (retry with weights_only=False) never reaches the user: it is wrong for a corrupt file
    and unsafe for a malicious one."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint shard")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty (an interrupted copy?); use another checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means the same thing to the user
        raise CheckpointError(f"{path}: not a readable megatron_lite checkpoint (corrupt, truncated, or "
                              "written by another program); use another checkpoint") from None
    if not isinstance(state, dict) or "iteration" not in state:
        raise CheckpointError(f"{path}: not a megatron_lite checkpoint (no iteration/model entries)")
    return state


def read_checkpoint_args(root: str, iteration: Optional[int] = None) -> dict:
    """The run config (plain data) saved in ``root``'s checkpoint: every shard carries the same."""
    if iteration is None:
        iteration = read_latest_iteration(root)
        if iteration is None:
            raise CheckpointError(f"--load {root}: no {TRACKER_FILE} found; is this a checkpoint directory?")
    iter_dir = checkpoint_dir(root, iteration)
    shards = sorted(d for d in (os.listdir(iter_dir) if os.path.isdir(iter_dir) else [])
                    if d.startswith("mp_rank_"))
    if not shards:
        raise CheckpointError(f"--load {root}: {iter_dir} holds no mp_rank_* shard; the checkpoint is incomplete")
    args = read_shard(os.path.join(iter_dir, shards[0], "model_optim_rng.pt")).get("args")
    if not isinstance(args, dict) or "model" not in args:
        raise CheckpointError(f"--load {root}: the checkpoint does not record the config it was trained with")
    return args





def _rng_state() -> dict:
    # numpy's and Python's states become plain lists so weights_only loading accepts them.
    np_state, (_, py_state, py_pos) = np.random.get_state(), random.getstate()
    state = {
        "random_rng_state": list(py_state),
        "random_rng_pos": py_pos,
        "np_rng_state": torch.from_numpy(np_state[1].astype(np.int64)),
        "np_rng_pos": int(np_state[2]),
        "torch_rng_state": torch.get_rng_state(),
        "tracker_states": get_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["random_rng_state"]), state["random_rng_pos"]))
    np.random.set_state(("MT19937", state["np_rng_state"].numpy().astype(np.uint32), state["np_rng_pos"], 0, 0.0))
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    get_rng_tracker().set_states(state["tracker_states"])


# Model fields whose change changes the weights' shapes or meaning, and the flags that set them.
MODEL_SHAPE_FLAGS = (
    ("num_layers", "--num-layers"),
    ("hidden_size", "--hidden-size"),
    ("ffn_hidden_size", "--ffn-hidden-size"),
    ("num_attention_heads", "--num-attention-heads"),
    ("padded_vocab_size", "--vocab-size (padded vocabulary; also --make-vocab-size-divisible-by, tokenizer)"),
    ("position_embedding_type", "--position-embedding-type"),
    ("untie_embeddings_and_output_weights", "--untie-embeddings-and-output-weights"),
    ("max_position_embeddings", "--max-position-embeddings"),
)
MAX_NAMES = 3  # names listed in a one-line key/shape mismatch message


def _config_differences(saved: dict, run: dict) -> List[str]:
    """'--flag: checkpoint X, this run Y' for each model-shape field both configs record and differ in."""
    saved_model, run_model = saved.get("model"), run.get("model")
    if not isinstance(saved_model, dict) or not isinstance(run_model, dict):
        return []
    out = []
    for name, flag in MODEL_SHAPE_FLAGS:
        if name in saved_model and name in run_model and saved_model[name] != run_model[name]:
            out.append(f"{flag}: checkpoint {saved_model[name]}, this run {run_model[name]}")
    return out


def _precision(model_cfg: dict) -> str:
    return "bf16" if model_cfg.get("bf16") else "fp16" if model_cfg.get("fp16") else "fp32"


def _names(names: List[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES])
    return shown + (f" (+{len(names) - MAX_NAMES} more)" if len(names) > MAX_NAMES else "")


def _check_state_dict(path: str, key: str, saved, chunk: torch.nn.Module) -> None:
    """Refuse, in one line, a saved model state that load_state_dict would reject (or half-apply)."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: entry {key!r} is a {type(saved).__name__}, not a model state dict; "
                              "not a megatron_lite checkpoint")
    want = chunk.state_dict()
    missing = [k for k in want if k not in saved]
    unexpected = [k for k in saved if k not in want]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weights ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unknown weights ({_names(unexpected)})")
        raise CheckpointError(f"{path}: entry {key!r} does not match this model: {'; '.join(parts)}; "
                              "was it saved by another program or another model?")
    bad = []
    for k, v in want.items():
        s = saved[k]
        if not isinstance(s, torch.Tensor):
            bad.append(f"{k} (a {type(s).__name__}, not a tensor)")
        elif isinstance(v, torch.Tensor) and tuple(s.shape) != tuple(v.shape):
            bad.append(f"{k} (checkpoint {list(s.shape)}, this run {list(v.shape)})")
    if bad:
        raise CheckpointError(f"{path}: entry {key!r} has {len(bad)} weights of another shape: {_names(bad)}; "
                              "the checkpoint was saved with another model size")


def _restore(path: str, what: str, fn, value) -> None:
    """``fn(value)``; a saved state of the wrong structure becomes one line naming the file."""
    try:
        fn(value)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot restore the {what} ({reason[:200]}); the checkpoint is damaged "
                              f"or from another program") from None


def save_checkpoint(root: str, iteration: int, model_chunks: List[torch.nn.Module], optimizer=None,
                    lr_scheduler=None, consumed_samples: int = 0, config_dict: Optional[dict] = None,
                    pstate: Optional[ParallelState] = None) -> str:
    """Every rank of DP rank 0 writes its model shard (under ZeRO-1 every rank also its optimizer
    slices) into ``iter_N.staging``; when all have, rank 0 renames it to ``iter_N`` and then
    replaces the tracker file. A kill at any moment leaves the tracker naming a complete
    checkpoint, and no directory that a load reads is ever written into."""
    ps = require_state(pstate)
    final = os.path.join(root, f"iter_{iteration:07d}")
    staging = final + STAGING_SUFFIX
    if ps.rank == 0 and os.path.isdir(staging):
        shutil.rmtree(staging)  # left by a save that was killed
    _barrier()
    path = os.path.join(staging, shard_name(ps.tp_rank, ps.pp_rank, ps.pp_size), "model_optim_rng.pt")
    if ps.dp_rank == 0:
        state = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration,
            "consumed_train_samples": consumed_samples,
            "layout": {"tensor_model_parallel_size": ps.tp_size, "pipeline_model_parallel_size": ps.pp_size,
                       "virtual_pipeline_model_parallel_size": len(model_chunks)},
            "args": config_dict or {},
            "rng_state": _rng_state(),
            "param_meta": describe_params(model_chunks, ps),
            "optimizer_params": optimizer_param_names(model_chunks),
        }
        for key, chunk in zip(model_keys(len(model_chunks)), model_chunks):
            state[key] = chunk.state_dict()
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        if lr_scheduler is not None:
            state["opt_param_scheduler"] = lr_scheduler.state_dict()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    if optimizer is not None and hasattr(optimizer, "sharded_state_dict"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(distrib_optim_file(path, ps.dp_rank)) as tmp:
            torch.save(optimizer.sharded_state_dict(), tmp)
    _barrier()
    if ps.rank == 0:
        _publish(staging, final)
        atomic_write_text(os.path.join(root, TRACKER_FILE), str(iteration), fsync=True)
    _barrier()
    return os.path.join(final, shard_name(ps.tp_rank, ps.pp_rank, ps.pp_size), "model_optim_rng.pt")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _publish(staging: str, final: str) -> None:
    """Rename the complete staging directory into place; an older copy of the same iteration is
    moved aside first and removed only after (``checkpoint_dir`` finds it in between)."""
    replaced = final + REPLACED_SUFFIX
    if os.path.isdir(replaced) and os.path.isdir(final):
        shutil.rmtree(replaced)
    if os.path.isdir(final):
        os.rename(final, replaced)
    os.rename(staging, final)
    if os.path.isdir(replaced):
        shutil.rmtree(replaced)


def _layout_error(root: str, iteration: int, saved: dict, ps, num_chunks: int,
                  expected_config: Optional[dict]) -> CheckpointError:
    """'saved at TP.. PP.. VP.., this run ..; convert it with: <the exact command>'."""
    def show(tp, pp, vp):
        return f"TP={tp} PP={pp}" + (f" VP={vp}" if vp and vp > 1 else "")

    vp_layers = ((expected_config or {}).get("parallel") or {}).get("num_layers_per_virtual_pipeline_stage")
    target = root.rstrip("/") + f"_tp{ps.tp_size}_pp{ps.pp_size}" + (f"_vp{num_chunks}" if num_chunks > 1 else "")
    cmd = (f"python tools/checkpoint_convert.py --load-dir {root} --save-dir {target} "
           f"--target-tensor-parallel-size {ps.tp_size} --target-pipeline-parallel-size {ps.pp_size}")
    if vp_layers:
        cmd += f" --target-num-layers-per-virtual-pipeline-stage {vp_layers}"
    if saved.get("tensor_model_parallel_size") is None:
        where = "with another layout"
    else:
        where = "at " + show(saved.get("tensor_model_parallel_size"), saved.get("pipeline_model_parallel_size"),
                             saved.get("virtual_pipeline_model_parallel_size"))
    return CheckpointError(f"--load {root}: iteration {iteration} was saved {where}, this run is "
                           f"{show(ps.tp_size, ps.pp_size, num_chunks)}; run at the saved layout, or convert it "
                           f"with: {cmd} (add --with-optim to keep the optimizer state) and --load {target}")


def load_checkpoint(root: str, model_chunks: List[torch.nn.Module], optimizer=None, lr_scheduler=None,
                    pstate: Optional[ParallelState] = None, iteration: Optional[int] = None,
                    load_optim: bool = True, load_rng: bool = True,
                    expected_config: Optional[dict] = None) -> dict:
    """Load this rank's shard. Returns {'iteration', 'consumed_train_samples', 'args', 'optimizer_loaded',
    'messages'}.

    ``optimizer_loaded`` says whether optimizer state was restored (the caller rebuilds fp32 masters
    from the weights only when it was not). With ``expected_config`` (the run's ``Config.to_dict()``),
    a checkpoint of another model shape is refused before anything is loaded, naming the flags that
    differ; one of another precision (fp32 / fp16 / bf16) loads its weights but not its optimizer
    state, and ``messages`` says so. Every check runs before the first state is applied."""
    ps = require_state(pstate)
    if iteration is None:
        iteration = read_latest_iteration(root)
        if iteration is None:
            raise CheckpointError(f"--load {root}: no {TRACKER_FILE} found; is this a checkpoint directory?")
    path = checkpoint_file(root, iteration, ps.tp_rank, ps.pp_rank, ps.pp_size)
    want = {"tensor_model_parallel_size": ps.tp_size, "pipeline_model_parallel_size": ps.pp_size,
            "virtual_pipeline_model_parallel_size": len(model_chunks)}
    if not os.path.isfile(path):
        iter_dir = checkpoint_dir(root, iteration)
        present = sorted(os.listdir(iter_dir)) if os.path.isdir(iter_dir) else []
        if not any(d.startswith("mp_rank_") for d in present):
            # Nothing of any layout there: the tracker (or the copy) is at fault, not the layout.
            what = "holds no mp_rank_* shard" if os.path.isdir(iter_dir) else "does not exist"
            raise CheckpointError(
                f"--load {root}: {TRACKER_FILE} names iteration {iteration}, but "
                f"{os.path.relpath(iter_dir, root)} {what}; the tracker file is wrong or the checkpoint "
                "is incomplete")
        shard = next(d for d in present if d.startswith("mp_rank_"))
        other = read_shard(os.path.join(iter_dir, shard, "model_optim_rng.pt")).get("layout") or {}
        if other != want:
            raise _layout_error(root, iteration, other, ps, len(model_chunks), expected_config)
        raise CheckpointError(f"--load {root}: iteration {iteration} has no shard {os.path.relpath(path, root)} "
                              f"(found {present}); the checkpoint is incomplete (an interrupted copy?)")
    state = read_shard(path)
    layout = state.get("layout", {})
    if layout and layout != want:
        raise _layout_error(root, iteration, layout, ps, len(model_chunks), expected_config)
    saved_args = state.get("args", {})
    saved_args = saved_args if isinstance(saved_args, dict) else {}
    messages: List[str] = []
    precision_changed = False
    if expected_config:
        diffs = _config_differences(saved_args, expected_config)
        if diffs:
            raise CheckpointError(f"{path}: saved with another model shape: {'; '.join(diffs)}; "
                                  "run with the checkpoint's model flags")
        saved_model, run_model = saved_args.get("model"), expected_config.get("model")
        if isinstance(saved_model, dict) and isinstance(run_model, dict) \
                and _precision(saved_model) != _precision(run_model):
            precision_changed = True
            if load_optim and optimizer is not None and "optimizer" in state:
                messages.append(f"> {path}: saved in {_precision(saved_model)}, this run is "
                                f"{_precision(run_model)}: loaded the weights, not the optimizer state; "
                                "the fp32 master weights are rebuilt from the weights and Adam's moments "
                                "start afresh")
    keys = model_keys(len(model_chunks))
    for key, chunk in zip(keys, model_chunks):
        if key not in state:
            raise CheckpointError(f"{path}: no {key!r} entry (has {_names(sorted(map(str, state)))}); "
                                  "not a megatron_lite checkpoint of this model")
        _check_state_dict(path, key, state[key], chunk)
    for key, chunk in zip(keys, model_chunks):
        chunk.load_state_dict(state[key])
    optimizer_loaded = load_optim and optimizer is not None and "optimizer" in state and not precision_changed
    if optimizer_loaded:
        _load_optimizer(path, optimizer, state["optimizer"])
    if load_optim and lr_scheduler is not None and "opt_param_scheduler" in state:
        _restore(path, "learning-rate schedule", lr_scheduler.load_state_dict, state["opt_param_scheduler"])
    if load_rng and "rng_state" in state:
        _restore(path, "random-number generator state", _set_rng_state, state["rng_state"])
    return {"iteration": state["iteration"], "consumed_train_samples": state.get("consumed_train_samples", 0),
            "args": saved_args, "optimizer_loaded": optimizer_loaded, "messages": messages}
