"""Optimizer pieces against hand-computed values and single-process references.

- lr schedule: warmup, linear, cosine, constant, min-lr tail, warmup fraction, state round trip;
- param groups: no weight decay on biases and norm weights (and the update shows it);
- dynamic loss scaler: backoff with hysteresis, growth after the window, min scale;
- bf16/fp16 with fp32 master weights: same update as fp32 on the same grads; fp16 inf skips;
- multi-rank: global grad norm, clipping and the AdamW step at TP=2 x PP=2 and TP=2 x DP=2 equal the
  single-process ones on the full tensors (TP-duplicated and tied-embedding copies counted once).
"""
import math

import pytest
import torch
from torch import nn

from dist_helpers import run_distributed
from megatron_lite.config import OptimizerConfig, ModelConfig
from megatron_lite.optim.clip import clip_grad_norm, count_zeros
from megatron_lite.optim.grad_scaler import DynamicGradScaler
from megatron_lite.optim.lr_schedule import LRScheduler
from megatron_lite.optim.optimizer import (FP32Optimizer, MixedPrecisionOptimizer, build_optimizer,
                                           get_param_groups)
from megatron_lite.parallel.state import ParallelState, initialize_parallel

MAX, MIN = 1e-3, 1e-5


def _sched(style, warmup=10, decay=100, **kw):
    return LRScheduler(None, MAX, MIN, style, decay, warmup_iters=warmup, **kw)


def test_lr_warmup_is_linear_from_zero():
    s = _sched("cosine")
    assert s.get_lr(0) == 0.0
    assert s.get_lr(5) == pytest.approx(5e-4, rel=1e-12)
    assert s.get_lr(10) == pytest.approx(1e-3, rel=1e-12)


def test_lr_linear_decay_values():
    s = _sched("linear")
    # r = (55 - 10) / 90 = 0.5 -> 1e-5 + 0.5 * 9.9e-4
    assert s.get_lr(55) == pytest.approx(5.05e-4, rel=1e-12)
    # r = (82 - 10) / 90 = 0.8 -> 1e-5 + 0.2 * 9.9e-4
    assert s.get_lr(82) == pytest.approx(2.08e-4, rel=1e-12)
    assert s.get_lr(100) == pytest.approx(MIN, rel=1e-12)
    assert s.get_lr(150) == MIN  # past --lr-decay-iters: --min-lr


def test_lr_cosine_decay_values():
    s = _sched("cosine")
    assert s.get_lr(55) == pytest.approx(5.05e-4, rel=1e-12)  # cos(pi/2) = 0: halfway
    # r = 1/3 -> 0.5 * (cos(pi/3) + 1) = 0.75 -> 1e-5 + 0.75 * 9.9e-4
    assert s.get_lr(40) == pytest.approx(7.525e-4, rel=1e-12)
    assert s.get_lr(100) == pytest.approx(MIN, rel=1e-12)
    assert s.get_lr(101) == MIN


def test_lr_constant_and_no_warmup():
    s = _sched("constant")
    assert s.get_lr(3) == pytest.approx(3e-4)
    assert s.get_lr(11) == MAX and s.get_lr(1000) == MAX
    s = _sched("linear", warmup=0)
    assert s.get_lr(0) == MAX
    assert s.get_lr(50) == pytest.approx(1e-5 + 0.5 * 9.9e-4, rel=1e-12)


def test_lr_warmup_fraction_and_state_round_trip():
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=123.0)
    s = LRScheduler(opt, MAX, MIN, "linear", 200, warmup_fraction=0.05)
    assert s.warmup_iters == 10
    assert opt.param_groups[0]["lr"] == 0.0  # applied at construction: iteration 1 uses lr(0)
    for _ in range(7):
        s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(7e-4)
    t = LRScheduler(torch.optim.SGD([p], lr=1.0), MAX, MIN, "linear", 200, warmup_fraction=0.05)
    t.load_state_dict(s.state_dict())
    assert t.num_steps == 7 and t.optimizer.param_groups[0]["lr"] == pytest.approx(7e-4)
    u = LRScheduler(None, MAX, MIN, "linear", 400, warmup_iters=0)  # a longer run resumed from s
    u.load_state_dict(s.state_dict())
    assert u.get_lr() == pytest.approx(MIN + (MAX - MIN) * (1 - 7 / 400), rel=1e-12)


def test_lr_warmup_fraction_is_not_rounded_to_whole_iterations():
    # Megatron-LM: lr_warmup_steps = fraction x lr_decay_steps, kept fractional. 0.05 x 50 = 2.5.
    s = LRScheduler(None, MAX, MIN, "linear", 50, warmup_fraction=0.05)
    assert s.warmup_iters == 2.5
    assert s.get_lr(1) == pytest.approx(MAX * 1 / 2.5, rel=1e-12)  # 4e-4 (rounding W to 2 gives 5e-4)
    assert s.get_lr(2) == pytest.approx(8e-4, rel=1e-12)  # still warming up (W = 2 would give MAX)
    # step 3 decays: r = (3 - 2.5) / (50 - 2.5) = 1/95 -> 1e-5 + (1 - 1/95) x 9.9e-4
    assert s.get_lr(3) == pytest.approx(1e-5 + (94 / 95) * 9.9e-4, rel=1e-12)
    assert s.get_lr(26.25) == pytest.approx(1e-5 + 0.5 * 9.9e-4, rel=1e-12)  # r = 23.75 / 47.5 = 1/2
    c = LRScheduler(None, MAX, MIN, "cosine", 50, warmup_fraction=0.05)
    # cosine at r = 1/95: 0.5 x (cos(pi/95) + 1)
    assert c.get_lr(3) == pytest.approx(1e-5 + 0.5 * (math.cos(math.pi / 95) + 1) * 9.9e-4, rel=1e-12)
    assert c.get_lr(50) == pytest.approx(MIN, rel=1e-12) and c.get_lr(51) == MIN


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 4)
        self.layernorm = nn.LayerNorm(4)


def test_no_weight_decay_on_biases_and_norms():
    m = _Block()
    groups = {g["name"]: g for g in get_param_groups([m], 0.1)}
    decayed = {id(p) for p in groups["decay"]["params"]}
    assert decayed == {id(m.embedding.weight), id(m.fc.weight)}
    assert {id(p) for p in groups["no_decay"]["params"]} == {id(m.fc.bias), id(m.layernorm.weight),
                                                               id(m.layernorm.bias)}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    # With zero gradients AdamW moves only decayed weights: w <- w * (1 - lr * wd).
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = build_optimizer([m], OptimizerConfig(lr=0.5, weight_decay=0.1, clip_grad=0.0), ModelConfig(),
                          ParallelState())
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    assert opt.step()[0]
    for n, p in m.named_parameters():
        expected = before[n] * (1 - 0.5 * 0.1) if n in ("embedding.weight", "fc.weight") else before[n]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)


def test_dynamic_loss_scaler_backoff_hysteresis_growth():
    s = DynamicGradScaler(initial_scale=1024.0, min_scale=64.0, growth_interval=3, hysteresis=2)
    s.update(True)
    assert s.scale == 1024.0  # first overflow absorbed by hysteresis
    s.update(True)
    assert s.scale == 512.0
    s.update(True)
    assert s.scale == 256.0  # hysteresis stays spent until a growth re-arms it
    for _ in range(3):
        s.update(False)
    assert s.scale == 512.0
    s.update(True)
    assert s.scale == 512.0  # re-armed
    for _ in range(10):
        s.update(True)
    assert s.scale == 64.0  # floored at --min-loss-scale
    t = DynamicGradScaler(1.0, 1.0)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()


def _mixed_model(dtype):
    torch.manual_seed(0)
    m = nn.Linear(4, 3).to(dtype)
    for p in m.parameters():  # values and grads exactly representable in bf16/fp16
        p.data = (torch.randint(-8, 8, p.shape).float() / 8).to(dtype)
        p.grad = (torch.randint(-8, 8, p.shape).float() / 16).to(dtype)
    return m


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_masters_match_fp32(dtype):
    cfg = OptimizerConfig(lr=0.01, weight_decay=0.1, clip_grad=0.3, loss_scale=None, initial_loss_scale=8.0)
    half = _mixed_model(dtype)
    ref = nn.Linear(4, 3)
    with torch.no_grad():
        for r, h in zip(ref.parameters(), half.parameters()):
            r.copy_(h.float())
            r.grad = h.grad.float().clone()
            if dtype == torch.float16:
                h.grad.mul_(8.0)  # the schedule scaled the loss by the loss scale
    mcfg = ModelConfig(fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16)
    opt = build_optimizer([half], cfg, mcfg, ParallelState())
    assert isinstance(opt, MixedPrecisionOptimizer)
    ref_opt = build_optimizer([ref], cfg, ModelConfig(), ParallelState())
    ok, norm, _ = opt.step()
    ok_ref, norm_ref, _ = ref_opt.step()
    assert ok and ok_ref and norm == pytest.approx(norm_ref, rel=1e-6)
    for master, r, h in zip(opt.main_params(), ref.parameters(), half.parameters()):
        torch.testing.assert_close(master.detach(), r.detach(), rtol=1e-6, atol=1e-7)
        assert h.dtype == dtype
        torch.testing.assert_close(h.detach(), r.detach().to(dtype))


def test_fp16_overflow_skips_step_and_backs_off():
    cfg = OptimizerConfig(lr=0.01, initial_loss_scale=2.0 ** 16, hysteresis=1)
    m = _mixed_model(torch.float16)
    before = [p.detach().clone() for p in m.parameters()]
    opt = build_optimizer([m], cfg, ModelConfig(fp16=True), ParallelState())
    m.weight.grad[0, 0] = float("inf")
    ok, norm, _ = opt.step()
    assert not ok and norm is None and opt.get_loss_scale() == 2.0 ** 15
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p.detach(), b)


# ---- multi-rank: norm, clipping and the step over TP/PP/DP -----------------------------------
# One full "model": a column-parallel weight and bias (split on dim 0), a row-parallel weight (split
# on dim 1), a replicated norm weight, and a tied word embedding present on the first and last stage.
FULL_SHAPES = {"col_w": (8, 6), "col_b": (8,), "row_w": (6, 8), "norm_w": (6,), "emb": (16, 6)}
SPLIT_DIM = {"col_w": 0, "col_b": 0, "row_w": 1, "emb": 0}
STAGE = {"col_w": 0, "col_b": 0, "emb": 0, "row_w": 1, "norm_w": 1}  # PP stage of each tensor


def _full_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) for k, s in FULL_SHAPES.items()}


class _Holder(nn.Module):
    def __init__(self, tensors):
        super().__init__()
        for k, t in tensors.items():
            self.register_parameter(k, nn.Parameter(t.clone()))


def _local_model(ps, weights, grads):
    """This rank's shards (with the parallel attributes the layers set) and their grads."""
    local, local_grads = {}, {}
    for k in FULL_SHAPES:
        on_stage = STAGE[k] == ps.pp_rank or (k == "emb" and ps.pp_rank == ps.pp_size - 1)
        if ps.pp_size == 1:
            on_stage = True
        if not on_stage:
            continue
        w, g = weights[k], grads[k]
        if k in SPLIT_DIM:
            w = w.chunk(ps.tp_size, SPLIT_DIM[k])[ps.tp_rank]
            g = g.chunk(ps.tp_size, SPLIT_DIM[k])[ps.tp_rank]
        local[k], local_grads[k] = w, g
    m = _Holder(local)
    for k, p in m.named_parameters():
        p.tensor_model_parallel = k in SPLIT_DIM
        if k == "emb":
            p.shared_embedding = True
        p.grad = local_grads[k].clone()
    return m


def _reference(max_norm, steps=2):
    weights = _full_tensors(1)
    m = _Holder(weights)
    opt = torch.optim.AdamW(get_param_groups([m], 0.1), lr=0.01, foreach=False)
    norms = []
    for step in range(steps):
        grads = _full_tensors(100 + step)
        for k, p in m.named_parameters():
            p.grad = grads[k].clone()
        norms.append(float(torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm)))
        opt.step()
    return norms, {k: p.detach() for k, p in m.named_parameters()}


def _layout_case(ps, max_norm):
    cfg = OptimizerConfig(lr=0.01, weight_decay=0.1, clip_grad=max_norm)
    m = _local_model(ps, _full_tensors(1), _full_tensors(100))
    unclipped = clip_grad_norm(m.parameters(), 0.0, ps)  # norm only
    zeros = count_zeros(m.parameters(), ps)
    opt = build_optimizer([m], cfg, ModelConfig(), ps)
    assert isinstance(opt, FP32Optimizer)
    norms = []
    for step in range(2):
        grads = _local_model(ps, _full_tensors(1), _full_tensors(100 + step))
        for (k, p), (_, q) in zip(m.named_parameters(), grads.named_parameters()):
            p.grad = q.grad.clone()
        norms.append(opt.step()[1])
    return {"unclipped": unclipped, "zeros": zeros, "norms": norms,
            "params": {k: p.detach().clone() for k, p in m.named_parameters()},
            "tp_rank": ps.tp_rank, "pp_rank": ps.pp_rank, "pp_size": ps.pp_size, "tp_size": ps.tp_size}


def _clip_layouts(rank, world):
    out = []
    for pp in (2, 1):  # TP=2 x PP=2, then TP=2 x DP=2 (DP replicas must not be double counted)
        ps = initialize_parallel(tensor=2, pipeline=pp)
        out.append(_layout_case(ps, max_norm=1.5))
    return out


@pytest.mark.timeout(120)
def test_clip_grad_norm_tp_pp_dp_matches_single_process():
    results = run_distributed(_clip_layouts, 4, timeout=110)
    grads = _full_tensors(100)
    full_norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    ref_norms, ref_params = _reference(1.5)
    assert ref_norms[0] == pytest.approx(full_norm, rel=1e-6) and full_norm > 1.5  # clipping is active
    for rank_results in results:
        for r in rank_results:
            assert r["unclipped"] == pytest.approx(full_norm, rel=1e-6)
            assert r["zeros"] == 0
            assert r["norms"] == pytest.approx(ref_norms, rel=1e-6)
            for k, p in r["params"].items():
                full = ref_params[k]
                expected = full.chunk(r["tp_size"], SPLIT_DIM[k])[r["tp_rank"]] if k in SPLIT_DIM else full
                torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)
