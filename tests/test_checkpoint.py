"""Checkpoints: Megatron layout, resume equals a continuous run, weights_only loading, a checkpoint of
another layout is refused with one clear line, and a crash mid-save leaves the previous checkpoint.
The same TP=2 runs (dropout on) show that a rerun and a run with full recompute give identical losses."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from dist_helpers import run_distributed

BASE = ["--mock-data", "--vocab-size", "256", "--make-vocab-size-divisible-by", "64",
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--lr-decay-iters", "6",
        "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--lr-warmup-iters", "1",
        # dropout on: a resume that forgot the RNG state would draw other masks
        "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
        "--log-interval", "100", "--eval-interval", "100", "--eval-iters", "0", "--seed", "11",
        "--distributed-backend", "gloo", "--tensor-model-parallel-size", "2"]


def _continuous_then_resumed(rank, world, root):
    from megatron_lite.config import parse_args
    from megatron_lite.parallel.state import get_parallel_state
    from megatron_lite.pretrain_gpt import pretrain_gpt as pretrain

    full = pretrain(parse_args(BASE + ["--train-iters", "6"]), world_size=world)
    recomputed = pretrain(parse_args(BASE + ["--train-iters", "6", "--recompute-granularity", "full",
                                             "--recompute-method", "uniform"]), world_size=world)
    first = pretrain(parse_args(BASE + ["--train-iters", "3", "--save", root]), world_size=world)
    resumed = pretrain(parse_args(BASE + ["--train-iters", "6", "--load", root]), world_size=world)
    if get_parallel_state().is_logging_rank:
        return {"full": full.losses, "recomputed": recomputed.losses, "first": first.losses,
                "resumed": resumed.losses, "resumed_iteration": resumed.iteration}
    return None


@pytest.mark.timeout(240)
def test_resume_matches_continuous_run_and_layout_is_megatrons(tmp_path):
    root = str(tmp_path / "ckpt")
    out = [r for r in run_distributed(_continuous_then_resumed, 2, args=(root,), timeout=220) if r][0]
    full, first, resumed = out["full"], out["first"], out["resumed"]
    # Dropout is on: a rerun with the same seed gives the same losses, bit for bit, and so does
    # full activation recompute (the recomputed forward replays the same dropout masks).
    assert len(full) == 6 and first == full[:3]
    assert out["recomputed"] == full
    # The resumed run continues at iteration 4 with the same data, weights, optimizer, LR and RNG.
    assert resumed[-3:] == full[3:], (resumed, full)
    assert out["resumed_iteration"] == 6

    assert open(os.path.join(root, "latest_checkpointed_iteration.txt")).read().strip() == "3"
    for tp_rank in (0, 1):
        path = os.path.join(root, "iter_0000003", f"mp_rank_{tp_rank:02d}", "model_optim_rng.pt")
        state = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
        assert state["iteration"] == 3 and state["consumed_train_samples"] == 12
        assert state["layout"]["tensor_model_parallel_size"] == 2
        assert state["args"]["parallel"]["tensor_model_parallel_size"] == 2
        assert {"model", "optimizer", "opt_param_scheduler", "rng_state"} <= set(state)
    assert not [f for _, _, fs in os.walk(root) for f in fs if ".tmp" in f]


def test_checkpoint_of_another_layout_is_one_clear_error(tmp_path):
    """A TP=2 checkpoint loaded by a TP=1 run: one 'error:' line naming the layouts, exit 2."""
    root = tmp_path / "ckpt"
    (root / "iter_0000003" / "mp_rank_00").mkdir(parents=True)
    (root / "iter_0000003" / "mp_rank_01").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("3")
    state = {"iteration": 3, "layout": {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
                                        "virtual_pipeline_model_parallel_size": 1}}
    torch.save(state, root / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt")
    args = BASE[:-2] + ["--tensor-model-parallel-size", "1"]
    r = subprocess.run([sys.executable, "-m", "megatron_lite.pretrain_gpt", *args, "--train-iters", "2",
                        "--load", str(root)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "TP=2" in errors[0] and "TP=1" in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from megatron_lite.config import ModelConfig
    from megatron_lite.model.gpt import GPTModel
    from megatron_lite.parallel.state import ParallelState
    from megatron_lite.training import checkpoint as ckpt

    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=8, vocab_size=64,
                      hidden_dropout=0.0, attention_dropout=0.0)
    cfg.padded_vocab_size = 128
    model = GPTModel(cfg, ParallelState())
    root = str(tmp_path)
    ckpt.save_checkpoint(root, 1, [model], pstate=ParallelState())

    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:  # a half-written file, then the process "dies"
            fh.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 2, [model], pstate=ParallelState())
    monkeypatch.setattr(torch, "save", real_save)

    assert ckpt.read_latest_iteration(root) == 1
    assert not os.path.exists(ckpt.checkpoint_file(root, 2, 0, 0, 1))
    fresh = GPTModel(cfg, ParallelState(), seed=99)
    info = ckpt.load_checkpoint(root, [fresh], pstate=ParallelState())
    assert info["iteration"] == 1
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
