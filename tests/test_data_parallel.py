"""Data parallelism: contiguous grad buffers, bucketed (overlapped) reduction and ZeRO-1, against
the single-process run.

Tolerances: fp32 losses and grad norms within 1e-5 relative of one process (dropout off, same
seed, mock tokens); bf16 / fp16 within 1e-2 relative of fp32 and of each other across layouts
(half-precision rounding of activations, different reduction orders per layout). Resume under
ZeRO-1 is bitwise; resume at another DP size gives the next losses within 1e-6 relative.
The full {1, 2}^3 x {plain, overlap, ZeRO-1, ZeRO-1 + overlap} sweep runs through
``tools/loss_parity.py`` in the slow test at the end.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from dist_helpers import run_distributed
from test_train_parity import BASE, FOUR_LAYERS, STEPS

ZERO = ["--use-distributed-optimizer"]
# Small buckets, so a tiny model has several and the overlap is visible.
OVERLAP = ["--overlap-grad-reduce", "--ddp-bucket-size", "20000"]
GATHER = ["--overlap-param-gather"]


def tp(n):
    return ["--tensor-model-parallel-size", str(n)]


def pp(n):
    return ["--pipeline-model-parallel-size", str(n)]


INTERLEAVED = FOUR_LAYERS + pp(2) + ["--num-layers-per-virtual-pipeline-stage", "1"]


def _train(rank, world, variants):
    from megatron_lite.config import parse_args
    from megatron_lite.parallel.state import get_parallel_state
    from megatron_lite.pretrain_gpt import pretrain_gpt

    out = {}
    for name, extra in variants.items():
        summary = pretrain_gpt(parse_args(BASE + extra), world_size=world)
        out[name] = {"state_bytes": summary.optimizer_state_bytes}  # every rank's own
        if get_parallel_state().is_logging_rank:
            out[name].update(losses=summary.losses, grad_norms=summary.grad_norms, skipped=summary.skipped_iters)
    return out


def _curves(world, variants, timeout):
    """name -> the logging rank's curves, plus "state_bytes": every rank's optimizer state, by rank."""
    merged = {}
    for r in run_distributed(_train, world, args=(variants,), timeout=timeout):
        for name, got in r.items():
            entry = merged.setdefault(name, {"state_bytes": []})
            entry["state_bytes"].append(got.pop("state_bytes"))
            entry.update(got)
    return merged


@pytest.fixture(scope="module")
def single():
    return _curves(1, {"fp32": [], "fp32_4layers": FOUR_LAYERS, "bf16": ["--bf16"],
                       "fp16": ["--fp16", "--initial-loss-scale", "1024"]}, 180)


def _close(got, ref, rel):
    assert len(got["losses"]) == STEPS and all(math.isfinite(x) for x in got["losses"])
    assert got["losses"] == pytest.approx(ref["losses"], rel=rel)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=rel)


WORLD_2 = {
    "dp2": [],
    "dp2_overlap": OVERLAP,
    "dp2_zero": ZERO,
    "dp2_zero_overlap_gather": ZERO + OVERLAP + GATHER,
}
WORLD_4 = {
    "dp4_zero_overlap": ZERO + OVERLAP,
    "tp2_dp2_sp_zero_overlap": tp(2) + ["--sequence-parallel"] + ZERO + OVERLAP,
    "pp2_dp2_zero_overlap_gather": pp(2) + ZERO + OVERLAP + GATHER,  # tied embedding across stages
    "pp2_dp2_interleaved_zero_overlap_4layers": INTERLEAVED + ZERO + OVERLAP,
}


FP16 = ["--fp16", "--initial-loss-scale", "1024"]
HALF_4 = {"bf16_dp4_zero": ["--bf16"] + ZERO + OVERLAP,
          "bf16_tp2_dp2": ["--bf16"] + tp(2),
          "fp16_dp4_zero": FP16 + ZERO,
          "fp16_pp2_dp2_zero": FP16 + pp(2) + ZERO + OVERLAP}


@pytest.fixture(scope="module")
def two_ranks():
    return _curves(2, WORLD_2, 200)


@pytest.fixture(scope="module")
def four_ranks():
    return _curves(4, {**WORLD_4, **HALF_4}, 400)


@pytest.mark.timeout(600)
def test_two_and_four_ranks_match_single_process(single, two_ranks, four_ranks):
    curves = {**two_ranks, **{k: v for k, v in four_ranks.items() if k in WORLD_4}}
    assert set(curves) == set(WORLD_2) | set(WORLD_4)
    for name, got in curves.items():
        _close(got, single["fp32_4layers" if name.endswith("4layers") else "fp32"], 1e-5)


@pytest.mark.slow  # 21 s; the default run keeps under 15 minutes; the sweep below also covers 8 ranks
@pytest.mark.timeout(300)
def test_eight_ranks_tp2_pp2_dp2_match_single_process(single):
    curves = _curves(8, {"tp2_pp2_dp2_zero_overlap": tp(2) + pp(2) + ZERO + OVERLAP + GATHER}, 280)
    _close(curves["tp2_pp2_dp2_zero_overlap"], single["fp32"], 1e-5)


@pytest.mark.timeout(300)
def test_half_precision_agrees_with_fp32_and_across_layouts(single, four_ranks):
    curves = {k: v for k, v in four_ranks.items() if k in HALF_4}
    for precision in ("bf16", "fp16"):
        _close(single[precision], single["fp32"], 1e-2)
        for name, got in curves.items():
            if name.startswith(precision):
                assert got["skipped"] == 0, name
                _close(got, single[precision], 1e-2)
                _close(got, single["fp32"], 1e-2)


# ---- an inf in one rank's gradient ---------------------------------------------------------------
INF_AT = (2, 3)  # iterations (1-based) whose gradient gets an inf on DP rank 1


def _inf_run(rank, world, extra):
    import megatron_lite.training.trainer as trainer_mod
    from megatron_lite.config import parse_args
    from megatron_lite.parallel.state import get_parallel_state
    from megatron_lite.pretrain_gpt import pretrain_gpt

    record = {"ok": [], "scale": [], "unchanged": []}
    original_finalize = trainer_mod.finalize_model_grads
    calls = {"n": 0}

    def finalize_with_inf(model_chunks, pstate):
        calls["n"] += 1
        if pstate.dp_rank == 1 and calls["n"] in INF_AT:
            p = next(p for c in model_chunks for p in c.parameters())
            p.main_grad.view(-1)[0] = float("inf")  # before the DP reduction: every owner sees it
        original_finalize(model_chunks, pstate)

    original_step = trainer_mod.Trainer.train_step

    def train_step(self):
        before = [p.detach().clone() for c in self.model for p in c.parameters()]
        out = original_step(self)
        for c in self.model:
            c.finish_param_sync()
        after = [p.detach() for c in self.model for p in c.parameters()]
        record["ok"].append(out[1])
        record["scale"].append(self.optimizer.get_loss_scale())
        record["unchanged"].append(all(torch.equal(a, b) for a, b in zip(before, after)))
        return out

    trainer_mod.finalize_model_grads = finalize_with_inf
    trainer_mod.Trainer.train_step = train_step
    pretrain_gpt(parse_args(BASE + ["--fp16", "--initial-loss-scale", "1024", "--hysteresis", "2"] + extra),
                 world_size=world)
    return {"rank": get_parallel_state().rank, **record}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("extra", [[], ZERO], ids=["allreduce", "zero1"])
def test_inf_on_one_rank_skips_the_step_everywhere(extra):
    for r in run_distributed(_inf_run, 2, args=(extra,), timeout=180):
        assert r["ok"] == [True, False, False, True, True], r
        assert r["unchanged"][1] and r["unchanged"][2], r  # skipped steps leave the weights bit for bit
        assert not r["unchanged"][0] and not r["unchanged"][3], r
        # hysteresis 2: the first inf only arms the back-off, the second halves the scale
        assert r["scale"] == [1024.0, 1024.0, 512.0, 512.0, 512.0], r


# ---- overlap is real ---------------------------------------------------------------------------------
def _overlap_run(rank, world):
    from megatron_lite.config import parse_args
    from megatron_lite.distributed.data_parallel import DistributedDataParallel
    from megatron_lite.pretrain_gpt import pretrain_gpt

    events = []
    original_launch = DistributedDataParallel._launch
    original_hook = DistributedDataParallel._grad_accumulated

    def launch(self, buf, bucket):
        events.append(("launch", bucket.index))
        original_launch(self, buf, bucket)
        events.append(("async", bucket.grad_handle is not True))

    def hook(self, param):
        if self.is_last_microbatch:
            events.append(("grad", id(param)))
        original_hook(self, param)

    DistributedDataParallel._launch = launch
    DistributedDataParallel._grad_accumulated = hook
    pretrain_gpt(parse_args(BASE + OVERLAP + ["--train-iters", "1"]), world_size=world)
    return events


@pytest.mark.timeout(120)
def test_first_bucket_reduces_before_the_last_backward_ends():
    events = run_distributed(_overlap_run, 2, args=(), timeout=100)[0]
    first_launch = next(i for i, e in enumerate(events) if e[0] == "launch")
    last_grad = max(i for i, e in enumerate(events) if e[0] == "grad")
    launches = [e for e in events if e[0] == "launch"]
    assert len(launches) >= 3, "the tiny model should fill several 20k-element buckets"
    assert first_launch < last_grad, "the first bucket's all-reduce waited for the whole backward"
    assert all(flag for kind, flag in events if kind == "async"), "overlapped reductions must be asynchronous"
    assert sum(1 for e in events[:last_grad] if e[0] == "launch") >= 2


# ---- ZeRO-1 memory -----------------------------------------------------------------------------------
def test_zero1_optimizer_state_is_one_over_dp_per_rank(single, two_ranks, four_ranks):
    numel = 117_504  # parameters of the BASE model
    full = {p: single[p]["state_bytes"][0] for p in ("fp32", "bf16")}
    assert full["fp32"] == numel * 8 and full["bf16"] == numel * 12  # Adam moments (+ fp32 masters)
    for dp, precision, per_rank in ((2, "fp32", two_ranks["dp2_zero"]["state_bytes"]),
                                    (4, "fp32", four_ranks["dp4_zero_overlap"]["state_bytes"]),
                                    (4, "bf16", four_ranks["bf16_dp4_zero"]["state_bytes"])):
        assert two_ranks["dp2"]["state_bytes"] == [full["fp32"]] * 2  # without ZeRO-1: all of it on each rank
        # each element is owned by exactly one DP rank: the slices add up to the unsharded state
        assert sum(per_rank) == full[precision], (dp, precision, per_rank)
        # and each is 1/DP of it, give or take the alignment padding that falls into a slice
        assert max(abs(b - full[precision] / dp) for b in per_rank) <= 0.05 * full[precision] / dp, per_rank


# ---- resume with ZeRO-1 ------------------------------------------------------------------------------
RESUME = ["--train-iters", "6", "--lr-decay-iters", "6"]


def _zero_resume(rank, world, root, phase):
    from megatron_lite.config import parse_args
    from megatron_lite.parallel.state import get_parallel_state
    from megatron_lite.pretrain_gpt import pretrain_gpt

    if phase == "save":
        full = pretrain_gpt(parse_args(BASE + ZERO + RESUME + ["--bf16"]), world_size=world)
        pretrain_gpt(parse_args(BASE + ZERO + RESUME + ["--bf16", "--exit-interval", "3", "--save", root]),
                     world_size=world)
        resumed = pretrain_gpt(parse_args(BASE + ZERO + RESUME + ["--bf16", "--load", root]), world_size=world)
        out = {"full": full.losses, "resumed": resumed.losses}
    else:  # another DP size loads the same checkpoint
        out = {"resumed": pretrain_gpt(parse_args(BASE + ZERO + RESUME + ["--bf16", "--load", root]),
                                       world_size=world).losses}
    return out if get_parallel_state().is_logging_rank else None


@pytest.mark.timeout(300)
def test_zero1_resume_is_exact_and_recuts_for_another_dp_size(tmp_path):
    root = str(tmp_path / "ckpt")
    out = [r for r in run_distributed(_zero_resume, 2, args=(root, "save"), timeout=200) if r][0]
    assert out["resumed"] == out["full"][3:], out  # bit for bit
    files = sorted(os.listdir(os.path.join(root, "iter_0000003", "mp_rank_00")))
    assert files == ["distrib_optim_000.pt", "distrib_optim_001.pt", "model_optim_rng.pt"]
    for dp in (1, 4):
        other = [r for r in run_distributed(_zero_resume, dp, args=(root, "load"), timeout=200) if r][0]
        assert other["resumed"] == pytest.approx(out["full"][3:], rel=1e-6), (dp, other)


def test_zero1_checkpoint_without_the_flag_is_one_clear_error(tmp_path):
    root = str(tmp_path / "ckpt")
    run_distributed(_zero_resume_save_only, 1, args=(root,), timeout=60)
    proc = subprocess.run([sys.executable, "-m", "megatron_lite.pretrain_gpt"] + BASE +
                          ["--train-iters", "4", "--load", root], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "--use-distributed-optimizer" in lines[0] and "--no-load-optim" in lines[0], lines[0]


def _zero_resume_save_only(rank, world, root):
    from megatron_lite.config import parse_args
    from megatron_lite.pretrain_gpt import pretrain_gpt

    pretrain_gpt(parse_args(BASE + ZERO + ["--train-iters", "2", "--save", root]), world_size=world)


# ---- buffer layout (no ranks) ------------------------------------------------------------------------
def test_buffer_layout_pads_buckets_and_isolates_the_tied_embedding():
    from megatron_lite.distributed.param_and_grad_buffer import ParamAndGradBuffer
    from megatron_lite.parallel.params import mark_shared_embedding

    params = [torch.nn.Parameter(torch.randn(n)) for n in (300, 50, 1000, 7)]
    mark_shared_embedding(params[0])
    originals = [p.detach().clone() for p in params]
    buf = ParamAndGradBuffer(params, torch.float32, dp_size=4, bucket_size=900, shard_params=True)
    # reverse order: 7, 1000 (closes at >= 900), then 50, then the tied embedding alone
    assert [[p.numel() for p in b.params] for b in buf.buckets] == [[7, 1000], [50], [300]]
    for b in buf.buckets:
        assert b.numel % 128 == 0 and b.numel % 4 == 0  # lcm(DP, 128)
        for p in b.params:
            start, _ = buf.param_range(p)
            assert start % 64 == 0  # Megatron's alignment of parameter starts
    for p, o in zip(params, originals):
        assert torch.equal(p, o)  # the data moved into the buffer unchanged
        assert p.data.data_ptr() >= buf.param_data.data_ptr()
        assert p.main_grad.shape == p.shape
    unsharded = ParamAndGradBuffer([torch.nn.Parameter(torch.randn(n)) for n in (5, 6)], torch.float32, 4, None, False)
    assert len(unsharded.buckets) == 1 and unsharded.numel == 11  # no padding without ZeRO-1


# ---- the parity tool ---------------------------------------------------------------------------------
def _parity(args, tmp_path, timeout):
    out = tmp_path / "parity.json"
    proc = subprocess.run([sys.executable, "tools/loss_parity.py", "--json-out", str(out)] + args, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.timeout(300)
def test_parity_tool_runs_layouts_through_torchrun(tmp_path):
    proc, report = _parity(["--layouts", "tp2pp1dp1+zero+overlap", "--train-iters", "3"], tmp_path, 280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tp2pp1dp1+zero+overlap" in proc.stdout and "PASS" in proc.stdout
    assert [r["layout"] for r in report["runs"]] == ["tp2pp1dp1+zero+overlap"]
    for r in report["runs"]:
        assert r["passed"] and len(r["losses"]) == 3 and r["max_rel_loss"] <= 1e-5
    # a bad layout is one error line, before anything runs
    proc, _ = _parity(["--layouts", "tp2pp2"], tmp_path, 60)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "tp<T>pp<P>dp<D>" in errors[0], proc.stderr


def test_parity_tool_fails_a_layout_beyond_the_tolerance():
    import importlib.util

    spec = importlib.util.spec_from_file_location("loss_parity", os.path.join(ROOT, "tools", "loss_parity.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    ref = {"losses": [5.0, 4.0], "grad_norms": [1.0, 1.0]}
    near = {"ok": True, "layout": "a", "losses": [5.0 * (1 + 5e-6), 4.0], "grad_norms": [1.0, 1.0]}
    far = {"ok": True, "layout": "b", "losses": [5.0 * (1 + 2e-5), 4.0], "grad_norms": [1.0, 1.0]}
    assert tool.compare(near, ref, 1e-5)["passed"] and not tool.compare(far, ref, 1e-5)["passed"]
    assert not tool.compare({**near, "losses": [5.0]}, ref, 1e-5)["passed"]  # a run cut short fails
    assert "FAIL" in tool.table_row({**tool.compare(far, ref, 1e-5), "world": 2, "seconds": 1.0})


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_layout_up_to_eight_ranks(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("loss_parity", os.path.join(ROOT, "tools", "loss_parity.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    variants = ["plain", "overlap", "zero", "zero+overlap+gather"]
    proc, report = _parity(["--all-up-to", "8", "--variants", ",".join(variants)], tmp_path, 3500)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    expected = tool.all_layouts(8, variants)  # every power-of-two (TP, PP, DP) with <= 8 ranks, each variant
    assert [r["layout"] for r in report["runs"]] == expected
    assert {(r["tp"], r["pp"], r["dp"]) for r in report["runs"]} >= {
        (t, p, d) for t in (1, 2) for p in (1, 2) for d in (1, 2)}
    assert all(r["passed"] for r in report["runs"])


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_grads_accumulate_in_the_buffer_and_the_optimizer_reads_it_without_copies(bf16):
    from megatron_lite.config import ModelConfig, OptimizerConfig
    from megatron_lite.distributed.data_parallel import DDPConfig, DistributedDataParallel
    from megatron_lite.optim.optimizer import build_optimizer
    from megatron_lite.parallel.state import ParallelState

    dtype = torch.bfloat16 if bf16 else torch.float32
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).to(dtype)
    module.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    model = DistributedDataParallel(module, ParallelState(), DDPConfig())
    opt = build_optimizer([model], OptimizerConfig(lr=1e-2, clip_grad=0.0), ModelConfig(bf16=bf16), ParallelState())
    (buf,) = model.grad_buffers
    assert buf.grad_data.dtype == torch.float32  # fp32 accumulation for half-precision models too
    x = torch.randn(3, 8)
    model.zero_grad_buffer()
    opt.zero_grad()
    with model.no_sync():
        model(x.to(dtype)).float().square().mean().backward()
    model(x.to(dtype)).float().square().mean().backward()
    assert all(p.grad is None for p in module.parameters())  # moved into the buffer by the hook
    ref(x).square().mean().backward()
    for p, r in zip(module.parameters(), ref.parameters()):  # two micro-batches accumulated
        assert torch.allclose(p.main_grad, 2 * r.grad, rtol=2e-2 if bf16 else 1e-6, atol=1e-3 if bf16 else 1e-7)
    model.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok
    lo, hi = buf.grad_data.data_ptr(), buf.grad_data.data_ptr() + buf.grad_data.numel() * 4
    mains = opt.main_params()
    assert mains and all(m.grad is None or lo <= m.grad.data_ptr() < hi for m in mains)
    if bf16:
        assert all(lo <= m.grad.data_ptr() < hi for m in mains)  # the masters read the buffer: no fp32 copy
