"""Several torchrun agents on 127.0.0.1 as several nodes (c10d rendezvous), and restarts after a kill -9."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from dist_helpers import metrics_losses as _losses, run_entry_point
from megatron_lite.parallel.state import free_port

TINY = ["--mock-data", "--vocab-size", "128", "--make-vocab-size-divisible-by", "64", "--num-layers", "2",
        "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "1",
        "--global-batch-size", "4", "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "1e-3",
        "--log-interval", "1", "--eval-interval", "100000", "--eval-iters", "0", "--seed", "3",
        "--distributed-backend", "gloo", "--tensor-model-parallel-size", "2", "--distributed-timeout-minutes", "1"]


def _agents(args, tmp_path, max_restarts=0, nodes=2):
    """One torchrun agent per "node", 2 workers each, joined through a c10d rendezvous."""
    port, env = free_port(), dict(os.environ, OMP_NUM_THREADS="1")
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                              "--nproc-per-node", "2", "--max-restarts", str(max_restarts), "--rdzv-backend", "c10d",
                              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"job{port}", "--monitor-interval",
                              "0.5", "-m", "megatron_lite.pretrain_gpt", *args], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(nodes)]


def _wait(agents, timeout=240):
    outs = [a.communicate(timeout=timeout) for a in agents]
    return [a.returncode for a in agents], outs


@pytest.mark.timeout(300)
def test_two_agents_tp2_dp2_match_one_process(tmp_path):
    metrics = str(tmp_path / "two_nodes.jsonl")
    codes, outs = _wait(_agents(TINY + ["--train-iters", "5", "--metrics-jsonl", metrics], tmp_path))
    assert codes == [0, 0], outs
    single = run_entry_point(TINY + ["--train-iters", "5", "--tensor-model-parallel-size", "1",
                                     "--metrics-jsonl", str(tmp_path / "one.jsonl")], tmp_path, timeout=120)
    assert single.returncode == 0, single.stderr
    a, b = _losses(metrics), _losses(tmp_path / "one.jsonl")
    assert sorted(a) == [1, 2, 3, 4, 5]
    assert [a[i] for i in a] == pytest.approx([b[i] for i in a], rel=1e-5)
    # the straggler report: every log line carries the step time's spread over the 4 ranks
    recs = [json.loads(l) for l in open(metrics)]
    assert all(r["iter_time_min_s"] <= r["iter_time_s"] <= r["iter_time_max_s"] and 0 <= r["slowest_rank"] < 4
               for r in recs), recs
    assert "step time over ranks (ms): min" in "".join(o[0] for o in outs)


@pytest.mark.timeout(400)
def test_kill_9_of_a_worker_restarts_the_group_and_resumes_from_the_last_checkpoint(tmp_path):
    from megatron_lite.training import checkpoint as ckpt

    root, metrics = str(tmp_path / "ckpt"), str(tmp_path / "run.jsonl")
    run = TINY + ["--train-iters", "40", "--lr-decay-iters", "40", "--save", root, "--load", root,
                  "--save-interval", "5"]
    agents = _agents(run + ["--metrics-jsonl", metrics], tmp_path, max_restarts=1)
    deadline = time.time() + 180
    while time.time() < deadline and (not os.path.exists(metrics) or len(_losses(metrics)) < 12):
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(agents[1].pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    killed_at = max(_losses(metrics))
    os.kill(int(workers[0]), signal.SIGKILL)
    codes, outs = _wait(agents)
    assert codes == [0, 0], [o[1][-3000:] for o in outs]
    stdout = "".join(o[0] for o in outs)
    assert "no checkpoint there; training from scratch" in stdout  # the first start said so
    resumed = [int(line.rsplit("at iteration ", 1)[1].split()[0]) for line in stdout.splitlines()
               if line.startswith("> loaded checkpoint from")]
    assert len(resumed) == 1 and killed_at - 5 <= resumed[0] <= killed_at + 5, (resumed, killed_at)
    assert resumed[0] % 5 == 0  # iterations lost: at most the save interval
    # every saved checkpoint is complete
    assert ckpt.read_latest_iteration(root) == 40
    for d in sorted(os.listdir(root)):
        if d.startswith("iter_"):
            assert not d.endswith((ckpt.STAGING_SUFFIX, ckpt.REPLACED_SUFFIX)), d
            for shard in os.listdir(os.path.join(root, d)):
                ckpt.read_shard(os.path.join(root, d, shard, "model_optim_rng.pt"))
    # the losses after the restart are those of a run that was never interrupted
    straight = run_entry_point(TINY + ["--train-iters", "40", "--lr-decay-iters", "40", "--metrics-jsonl",
                                       str(tmp_path / "straight.jsonl")], tmp_path, nproc=4, timeout=200)
    assert straight.returncode == 0, straight.stderr
    got, want = _losses(metrics), _losses(tmp_path / "straight.jsonl")
    assert sorted(got) == list(range(1, 41))
    assert [got[i] for i in range(resumed[0] + 1, 41)] == [want[i] for i in range(resumed[0] + 1, 41)]


STALL_RUNNER = """
import os, sys, time
import megatron_lite.training.trainer as trainer_mod
original = trainer_mod.finalize_model_grads
calls = {"n": 0}
def stalled(model_chunks, pstate):
    calls["n"] += 1
    if pstate.rank == 1 and calls["n"] == 3:
        time.sleep(3600)  # the test hook: stuck in Python before the gradient reduction's collectives
    original(model_chunks, pstate)
trainer_mod.finalize_model_grads = stalled
from megatron_lite.pretrain_gpt import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(200)
def test_a_stalled_rank_makes_every_rank_exit_within_the_timeout_naming_it(tmp_path):
    runner = tmp_path / "stall.py"
    runner.write_text(STALL_RUNNER)
    timeout_s = 6  # --distributed-timeout-minutes 0.1
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
                           str(free_port()), str(runner), *TINY[:-2], "--train-iters", "10",
                           "--distributed-timeout-minutes", "0.1"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=180)
    elapsed = time.time() - start
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert sorted(l.split("]")[0] for l in errors) == ["error: [rank 0", "error: [rank 2", "error: [rank 3"], errors
    for line in errors:
        # where each waited: its own collective with rank 1, or one with a rank that waits on rank 1
        assert re.search(r"timed out after 0\.1 min \(--distributed-timeout-minutes\) in the "
                         r"(gradient reduction|optimizer step) of iteration 3;", line), line
        assert line.endswith("stopped answering: rank 1 (last seen at iteration 3, gradient reduction)"), line
    assert "Traceback" not in proc.stderr.split("error:")[0]
    # the stalled rank does not keep running: torchrun stops it once the others have failed
    assert elapsed < timeout_s + 60, elapsed
    assert subprocess.run(["pgrep", "-f", str(runner)], capture_output=True).returncode == 1
