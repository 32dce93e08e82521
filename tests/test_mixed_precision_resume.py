"""A bf16/fp16 resume restores the exact fp32 master weights (and the fp16 loss scaler): 10
iterations straight equal 5, save, resume, 5 more, bit for bit, in the losses and in the masters.
Rebuilding the masters from the half-precision weights after a load (the old behaviour) rounds
them, and the resumed losses drift."""
import pytest
import torch

from dist_helpers import run_distributed

BASE = ["--mock-data", "--vocab-size", "256", "--make-vocab-size-divisible-by", "64",
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--lr-decay-iters", "10",
        "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--lr-warmup-iters", "1",
        "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
        "--log-interval", "100", "--eval-interval", "100", "--eval-iters", "0", "--seed", "5",
        "--distributed-backend", "gloo"]


def _run(argv):
    """Train with the GPT task and keep the trainer, to read its optimizer afterwards."""
    from megatron_lite import pretrain_gpt as task
    from megatron_lite.config import parse_args, validate
    from megatron_lite.parallel.state import initialize_parallel
    from megatron_lite.training.trainer import Trainer

    cfg = validate(parse_args(argv), 1)
    pstate = initialize_parallel(1, 1, backend="gloo")
    trainer = Trainer(cfg, pstate, task.datasets_provider, task.model_provider, task.forward_step)
    summary = trainer.train()
    trainer.close()
    masters = [m.detach().clone() for m in trainer.optimizer.main_params()]
    scaler = trainer.optimizer.grad_scaler
    return summary.losses, masters, (None if scaler is None else scaler.state_dict())


def _straight_and_resumed(rank, world, precision, root):
    flags = BASE + [f"--{precision}"]
    if precision == "fp16":
        flags += ["--initial-loss-scale", "4096", "--loss-scale-window", "2"]  # the scale moves in 10 steps
    straight, straight_masters, straight_scaler = _run(flags + ["--train-iters", "10"])
    first, _, _ = _run(flags + ["--train-iters", "5", "--save", root])
    resumed, resumed_masters, resumed_scaler = _run(flags + ["--train-iters", "10", "--load", root])
    return {"straight": straight, "first": first, "resumed": resumed,
            "masters_equal": [torch.equal(a, b) for a, b in zip(straight_masters, resumed_masters)],
            "masters_dtype": str(straight_masters[0].dtype),
            "scalers": (straight_scaler, resumed_scaler)}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_resume_is_exact(tmp_path, precision):
    out = run_distributed(_straight_and_resumed, 1, args=(precision, str(tmp_path / "ckpt")), timeout=220)[0]
    straight, first, resumed = out["straight"], out["first"], out["resumed"]
    assert len(straight) == 10 and first == straight[:5]
    assert resumed == straight[5:], (resumed, straight)  # bitwise: floats compared exactly
    assert out["masters_dtype"] == "torch.float32"
    assert out["masters_equal"] and all(out["masters_equal"])
    straight_scaler, resumed_scaler = out["scalers"]
    assert straight_scaler == resumed_scaler
    if precision == "fp16":
        assert straight_scaler is not None
