"""RNG tracker streams and activation checkpointing that replays dropout bit for bit."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_helpers import run_distributed
from megatron_lite.parallel.layers import ColumnParallelLinear, RowParallelLinear, init_method_normal
from megatron_lite.parallel.random import checkpoint, get_rng_tracker, model_parallel_seed
from megatron_lite.parallel.state import ParallelState, initialize_parallel


def _draw(seed, n=6):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def test_seeds_follow_megatron_offsets():
    for tp_rank, pp_rank in ((0, 0), (1, 0), (3, 2)):
        model_parallel_seed(1234, ParallelState(tp_size=4, pp_size=3, tp_rank=tp_rank, pp_rank=pp_rank))
        stage_seed = 1234 + 100 * pp_rank
        assert torch.equal(torch.rand(6), _draw(stage_seed))       # default stream: same on TP ranks
        with get_rng_tracker().fork():
            assert torch.equal(torch.rand(6), _draw(stage_seed + 2718 + tp_rank))


def test_fork_leaves_default_stream_untouched_and_advances_its_own():
    model_parallel_seed(7, ParallelState(tp_size=2, tp_rank=1))
    a = torch.rand(4)
    with get_rng_tracker().fork():
        f1 = torch.rand(4)
    b = torch.rand(4)
    with get_rng_tracker().fork():
        f2 = torch.rand(4)
    both = _draw(7, 8)
    assert torch.equal(torch.cat([a, b]), both)              # as if the forks never happened
    assert torch.equal(torch.cat([f1, f2]), _draw(7 + 2718 + 1, 8))  # the fork stream continues
    with pytest.raises(KeyError, match="model_parallel_seed"):
        with get_rng_tracker().fork("no-such-stream"):
            pass
    with pytest.raises(ValueError, match="already exists"):
        get_rng_tracker().add("other", 7 + 2718 + 1)


def test_tracker_states_round_trip():
    model_parallel_seed(3, ParallelState())
    saved = get_rng_tracker().get_states()
    with get_rng_tracker().fork():
        first = torch.rand(5)
    get_rng_tracker().set_states(saved)
    with get_rng_tracker().fork():
        assert torch.equal(torch.rand(5), first)


class _Block(nn.Module):
    """Linear -> dropout in the TP stream -> GELU -> dropout in the default stream; two outputs."""

    def __init__(self, ps, hidden=16):
        super().__init__()
        self.col = ColumnParallelLinear(hidden, 4 * hidden, init_method=init_method_normal(0.1, seed=1), pstate=ps)
        self.row = RowParallelLinear(4 * hidden, hidden, init_method=init_method_normal(0.1, seed=2), pstate=ps)

    def forward(self, x, scale, mask):
        h, _ = self.col(x)
        with get_rng_tracker().fork():
            h = F.dropout(h, p=0.3, training=True)
        y, _ = self.row(F.gelu(h))
        y = F.dropout(y, p=0.3, training=True) * scale
        return y, (y * mask).sum()


def _run_block(ps, checkpointed, x_requires_grad, distribute=False):
    """Forward + backward from a fixed RNG state; returns outputs, grads and the RNG state after."""
    torch.manual_seed(0)
    block = _Block(ps)
    model_parallel_seed(42, ps)
    x = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(5)).requires_grad_(x_requires_grad)
    mask = (torch.arange(16) % 3 == 0).float()
    if checkpointed:
        y, total = checkpoint(block, distribute, x, 2.0, mask, pstate=ps)
    else:
        y, total = block(x, 2.0, mask)
    (y.square().sum() + total).backward()
    after = (torch.get_rng_state(), get_rng_tracker().get_states()["model-parallel-rng"])
    grads = [p.grad.clone() for p in block.parameters()]
    return y.detach(), total.detach(), x.grad, grads, after


def _assert_same_run(a, b):
    y1, t1, dx1, g1, rng1 = a
    y2, t2, dx2, g2, rng2 = b
    assert torch.equal(y1, y2) and torch.equal(t1, t2)
    assert (dx1 is None and dx2 is None) or torch.equal(dx1, dx2)
    assert len(g1) == len(g2) and all(torch.equal(p, q) for p, q in zip(g1, g2))
    # Recompute restored the RNG it found: the streams continue exactly as without checkpointing.
    assert torch.equal(rng1[0], rng2[0]) and torch.equal(rng1[1], rng2[1])


@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_checkpoint_is_bitwise_equal_to_plain_run(x_requires_grad):
    ps = ParallelState()
    plain = _run_block(ps, checkpointed=False, x_requires_grad=x_requires_grad)
    ckpt = _run_block(ps, checkpointed=True, x_requires_grad=x_requires_grad)
    _assert_same_run(plain, ckpt)
    assert all(g.abs().sum() > 0 for g in ckpt[3])  # parameters got real grads
    assert (ckpt[2] is not None) == x_requires_grad


def test_checkpoint_without_grad_is_plain_forward():
    ps = ParallelState()
    torch.manual_seed(0)
    block = _Block(ps)
    model_parallel_seed(42, ps)
    x = torch.randn(6, 2, 16)
    with torch.no_grad():
        y, _ = checkpoint(block, False, x, 1.0, torch.ones(16), pstate=ps)
    assert not y.requires_grad


def _tp2_streams_and_checkpoint(rank, world):
    ps = initialize_parallel(tensor=world)
    model_parallel_seed(99, ps)
    default = torch.rand(4)
    with get_rng_tracker().fork():
        forked = torch.rand(4)
    plain = _run_block(ps, checkpointed=False, x_requires_grad=True)
    ckpt = _run_block(ps, checkpointed=True, x_requires_grad=True, distribute=True)
    _assert_same_run(plain, ckpt)
    return default, forked


@pytest.mark.timeout(120)
def test_tp2_fork_differs_per_rank_and_distributed_checkpoint_matches():
    (d0, f0), (d1, f1) = run_distributed(_tp2_streams_and_checkpoint, 2, timeout=100)
    assert torch.equal(d0, d1)           # default stream: the same numbers on every TP rank
    assert not torch.equal(f0, f1)       # model-parallel stream: different per TP rank
