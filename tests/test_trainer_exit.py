"""Run control: --exit-interval stops at the named iteration (saving first when --save is set),
--exit-duration-in-mins stops a run that has used its time."""
import os

import pytest

from dist_helpers import run_distributed

TINY = ["--mock-data", "--vocab-size", "128", "--num-layers", "1", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "8", "--micro-batch-size", "2", "--train-iters", "20",
        "--log-interval", "100", "--eval-interval", "100", "--eval-iters", "0", "--distributed-backend", "gloo"]


def _run(rank, world, extra):
    from megatron_lite.config import parse_args
    from megatron_lite.pretrain_gpt import pretrain_gpt as pretrain
    summary = pretrain(parse_args(TINY + extra), world_size=world)
    return {"iteration": summary.iteration, "exit_reason": summary.exit_reason, "losses": len(summary.losses)}


@pytest.mark.timeout(120)
def test_exit_interval_stops_and_saves(tmp_path):
    out = run_distributed(_run, 1, args=(["--exit-interval", "3", "--save", str(tmp_path)],), timeout=100)[0]
    assert out["iteration"] == 3 and out["losses"] == 3
    assert out["exit_reason"] == "exit_interval"
    assert open(os.path.join(tmp_path, "latest_checkpointed_iteration.txt")).read().strip() == "3"


@pytest.mark.timeout(120)
def test_exit_duration_stops_an_expired_run():
    # A budget of ~0 minutes is used up after the first iteration.
    out = run_distributed(_run, 1, args=(["--exit-duration-in-mins", "0.00001"],), timeout=100)[0]
    assert 1 <= out["iteration"] < 20
    assert out["exit_reason"] == "exit_duration"
