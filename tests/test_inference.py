"""Inference from a checkpoint at its saved layout (megatron_lite.inference, through tools/generate_text.py).

With --lr 0 the saved weights are the initial ones, which do not depend on the layout, so greedy
generation from a TP=1 PP=1, a TP=1 PP=2 and a TP=2 PP=1 checkpoint must give the same text:
the PP=2 run goes through the forward-only pipeline schedule and a broadcast from the last stage.
"""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from dist_helpers import free_port, run_entry_point

TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
TRAIN = ["--mock-data", "--vocab-file", os.path.join(TOKENIZER, "vocab.json"),
         "--merge-file", os.path.join(TOKENIZER, "merges.txt"), "--make-vocab-size-divisible-by", "64",
         "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
         "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "1", "--lr", "0", "--min-lr", "0",
         "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-iters", "0", "--seed", "3",
         "--init-method-std", "0.2", "--distributed-backend", "gloo"]


def _generate(load, nproc, prompts=("Return the", "def main")):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), os.path.join(ROOT, "tools", "generate_text.py"),
           "--load", load, "--max-new-tokens", "12"]
    for p in prompts:
        cmd += ["--prompt", p]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.timeout(400)
def test_generation_is_the_same_at_every_saved_layout(tmp_path):
    texts = {}
    for name, layout, nproc in [("single", [], 1), ("pp2", ["--pipeline-model-parallel-size", "2"], 2),
                                ("tp2", ["--tensor-model-parallel-size", "2"], 2)]:
        save = str(tmp_path / name)
        r = run_entry_point(TRAIN + layout + ["--save", save], tmp_path, nproc=nproc, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        out = _generate(save, nproc)
        assert "loaded iteration 1" in out
        texts[name] = [line for line in out.splitlines() if not line.startswith("loaded")]
    assert texts["single"] == texts["pp2"] == texts["tp2"]
    assert sum(len(line) for line in texts["single"]) > len("--- prompt: 'Return the'")  # something generated

    # The PP=2 checkpoint with one process: one line saying how to launch it.
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate_text.py"),
                          "--load", str(tmp_path / "pp2")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "TP=1 PP=2" in errors[0] and "--nproc_per_node 2" in errors[0]
    assert "Traceback" not in out.stderr
