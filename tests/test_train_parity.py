"""The whole training step (schedule -> finalize grads -> clip -> AdamW -> lr) under every layout
gives the single-process loss curve.

One process trains the tiny model for 5 steps at a fixed global batch (8 sequences, micro-batch 2);
then, in one spawn per world size, every layout variant trains the same 5 steps from the same
seed: DP=2, TP=2, TP=4, TP=2 x DP=2, PP=2 (1F1B and interleaved), TP=2 x PP=2, with and without
--sequence-parallel and activation recompute. Losses and grad norms must match within 1e-5 relative.
Random (mock) tokens: nothing to learn, but every step's gradients differ, so a wrong reduction
shows in the grad norms at once and in the losses from step 2 on.
"""
import math

import pytest

from dist_helpers import run_distributed

STEPS = 5
BASE = ["--mock-data", "--vocab-size", "256", "--make-vocab-size-divisible-by", "64",
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(STEPS),
        "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "3e-3", "--lr-warmup-iters", "0",
        "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--clip-grad", "0.5", "--weight-decay", "0.1",
        "--log-interval", "100", "--eval-interval", "100", "--eval-iters", "0",
        "--seed", "7", "--distributed-backend", "gloo"]
SP = ["--sequence-parallel"]
FULL_RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform"]
SELECTIVE = ["--recompute-granularity", "selective"]
FOUR_LAYERS = ["--num-layers", "4"]  # the interleaved schedule needs 2 stages x 2 chunks of layers
UNTIED = ["--untie-embeddings-and-output-weights"]


def tp(n):
    return ["--tensor-model-parallel-size", str(n)]


def pp(n):
    return ["--pipeline-model-parallel-size", str(n)]


WORLD_2 = {
    "dp2": [],
    "tp2": tp(2),
    "tp2_sp": tp(2) + SP,
    "tp2_recompute": tp(2) + FULL_RECOMPUTE,
    "tp2_sp_recompute": tp(2) + SP + FULL_RECOMPUTE,
    "pp2": pp(2),
    "pp2_interleaved_4layers": FOUR_LAYERS + pp(2) + ["--num-layers-per-virtual-pipeline-stage", "1"],
    "pp2_gpipe": pp(2) + ["--pipeline-schedule", "gpipe"],
    "pp2_untied": pp(2) + UNTIED,  # no embedding group needed: the head is the last stage's own weight
    "pp2_uneven_4layers": FOUR_LAYERS + pp(2) + ["--decoder-first-pipeline-num-layers", "1"],  # 1 + 3 layers
}
WORLD_4 = {
    "tp2_dp2": tp(2),
    "tp2_dp2_sp": tp(2) + SP,
    "tp4": tp(4),
    "tp4_sp": tp(4) + SP,
    "tp4_recompute": tp(4) + FULL_RECOMPUTE,
    "tp4_sp_recompute": tp(4) + SP + FULL_RECOMPUTE,
    "tp4_selective": tp(4) + SELECTIVE,
    "tp2_pp2_sp": tp(2) + pp(2) + SP,
}


def _train_variants(rank, world, variants):
    """Train each variant in turn in these processes; return the curves held by the logging rank."""
    from megatron_lite.config import parse_args
    from megatron_lite.parallel.state import get_parallel_state
    from megatron_lite.pretrain_gpt import pretrain_gpt as pretrain

    out = {}
    for name, extra in variants.items():
        summary = pretrain(parse_args(BASE + extra), world_size=world)
        if get_parallel_state().is_logging_rank:
            out[name] = {"losses": summary.losses, "grad_norms": summary.grad_norms, "lrs": summary.lrs}
    return out


def _collect(results):
    merged = {}
    for r in results:
        merged.update(r)
    return merged


@pytest.fixture(scope="module")
def references():
    return run_distributed(_train_variants, 1, args=(
        {"single": [], "single_4layers": FOUR_LAYERS, "single_untied": UNTIED},), timeout=120)[0]


def _check(curves, references, names):
    assert set(curves) == set(names)
    for name in names:
        suffix = name.rsplit("_", 1)[-1]
        reference = references[f"single_{suffix}" if f"single_{suffix}" in references else "single"]
        ref_loss, ref_norm = reference["losses"], reference["grad_norms"]
        assert len(ref_loss) == STEPS and all(math.isfinite(x) for x in ref_loss)
        got = curves[name]
        assert got["losses"] == pytest.approx(ref_loss, rel=1e-5), name
        assert got["grad_norms"] == pytest.approx(ref_norm, rel=1e-5), name
        assert got["lrs"] == pytest.approx(reference["lrs"], rel=1e-12), name


@pytest.mark.timeout(200)
def test_two_ranks_match_single_process(references):
    curves = _collect(run_distributed(_train_variants, 2, args=(WORLD_2,), timeout=190))
    _check(curves, references, WORLD_2)


@pytest.mark.timeout(300)
def test_four_ranks_match_single_process(references):
    curves = _collect(run_distributed(_train_variants, 4, args=(WORLD_4,), timeout=290))
    _check(curves, references, WORLD_4)
