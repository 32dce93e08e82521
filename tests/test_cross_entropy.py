"""vocab_parallel_cross_entropy against F.cross_entropy on the gathered logits (value and grad)."""
import pytest
import torch
import torch.nn.functional as F

from dist_helpers import run_distributed
from megatron_lite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_lite.parallel.state import ParallelState, initialize_parallel

S, B, V = 6, 3, 32  # V splits evenly over TP = 2 and 4


def _full(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _reference(logits, target, weights, label_smoothing):
    logits = logits.clone().requires_grad_(True)
    loss = F.cross_entropy(logits.view(-1, V), target.view(-1), reduction="none",
                           label_smoothing=label_smoothing).view(target.shape)
    loss.backward(weights)
    return loss.detach(), logits.grad


def _check(ps, offset, label_smoothing):
    # Large offsets check the max subtraction: exp(1000) would overflow without it.
    logits = _full(1, S, B, V) * 4 + offset
    target = torch.randint(0, V, (S, B), generator=torch.Generator().manual_seed(2))
    target[0, 0], target[-1, -1] = 0, V - 1  # both ends of the vocabulary
    weights = _full(3, S, B).abs()           # upstream grad, e.g. a loss mask / num tokens
    ref_loss, ref_grad = _reference(logits, target, weights, label_smoothing)

    shard = logits.chunk(ps.tp_size, dim=-1)[ps.tp_rank].clone().requires_grad_(True)
    before = shard.detach().clone()
    loss = vocab_parallel_cross_entropy(shard, target, label_smoothing=label_smoothing, pstate=ps)
    assert loss.dtype == torch.float32 and loss.shape == (S, B)
    _close(loss, ref_loss)
    loss.backward(weights)
    _close(shard.grad, ref_grad.chunk(ps.tp_size, dim=-1)[ps.tp_rank])
    assert torch.equal(shard.detach(), before)  # the caller's logits are untouched


def _check_all(rank, world):
    ps = initialize_parallel(tensor=world) if world > 1 else ParallelState()
    cases = [(0.0, 0.0), (1000.0, 0.0), (0.0, 0.1)]
    for offset, smoothing in cases:
        _check(ps, offset, smoothing)
    return len(cases)


def test_tp1_matches_torch():
    assert _check_all(0, 1) == 3


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_matches_torch(tp):
    assert run_distributed(_check_all, tp, timeout=100) == [3] * tp


def test_half_precision_logits_give_fp32_loss_and_matching_grad_dtype():
    logits = _full(5, 4, V).bfloat16().requires_grad_(True)
    target = torch.arange(4)
    loss = vocab_parallel_cross_entropy(logits, target, pstate=ParallelState())
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.float(), target, reduction="none")
    _close(loss, ref.detach())
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="must agree"):
        vocab_parallel_cross_entropy(torch.zeros(4, 5, V), torch.zeros(4, dtype=torch.long), pstate=ParallelState())
