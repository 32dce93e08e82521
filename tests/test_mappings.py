"""TP mappings: forward and backward of every collective against single-process math.

Each rank builds the same full tensors from fixed seeds, so it can compute what every other
rank holds and therefore the exact expected result. Upstream gradients differ per rank, so a
wrong reduction (or a missing one) shows up.
"""
import pytest
import torch

from dist_helpers import run_distributed
from megatron_lite.parallel import mappings as M
from megatron_lite.parallel.state import ParallelState, initialize_parallel

S, B, H = 8, 3, 12  # seq, batch, hidden: divisible by TP = 2 and 4


def _full(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _run(fn, x, grad):
    """fn(x) and d(sum(out * grad))/dx on a leaf copy of x."""
    x = x.clone().requires_grad_(True)
    out = fn(x)
    out.backward(grad)
    return out.detach(), x.grad


def _check_all_mappings(rank, world):
    ps = initialize_parallel(tensor=world)
    tp, r = ps.tp_size, ps.tp_rank
    x = _full(0, S, B, H)                                   # replicated input
    xs = [_full(10 + i, S, B, H) for i in range(tp)]        # per-rank inputs (rank i holds xs[i])
    gs = [_full(100 + i, S, B, H) for i in range(tp)]       # per-rank upstream grads, full size
    g_last = [g.chunk(tp, dim=-1)[i] for i, g in enumerate(gs)]
    g_first = [g.chunk(tp, dim=0)[i] for i, g in enumerate(gs)]
    checked = []

    out, grad = _run(lambda t: M.copy_to_tp(t, ps), x, gs[r])
    _close(out, x)
    _close(grad, sum(gs))
    checked.append("copy_to_tp")

    out, grad = _run(lambda t: M.reduce_from_tp(t, ps), xs[r], gs[r])
    _close(out, sum(xs))
    _close(grad, gs[r])
    checked.append("reduce_from_tp")

    out, grad = _run(lambda t: M.scatter_to_tp(t, ps), x, g_last[r])
    _close(out, x.chunk(tp, dim=-1)[r])
    _close(grad, torch.cat(g_last, dim=-1))
    checked.append("scatter_to_tp")

    # Gather of non-contiguous shards (a transposed view) must still gather the right values.
    shards = [t.chunk(tp, dim=-1)[i] for i, t in enumerate(xs)]
    out, grad = _run(lambda t: M.gather_from_tp(t.transpose(0, 1).transpose(0, 1), ps), shards[r], gs[r])
    _close(out, torch.cat(shards, dim=-1))
    _close(grad, gs[r].chunk(tp, dim=-1)[r])
    checked.append("gather_from_tp")

    out, grad = _run(lambda t: M.scatter_to_sequence_parallel(t, ps), x, g_first[r])
    _close(out, x.chunk(tp, dim=0)[r])
    _close(grad, torch.cat(g_first, dim=0))
    checked.append("scatter_to_sequence_parallel")

    rows = [t.chunk(tp, dim=0)[i] for i, t in enumerate(xs)]
    out, grad = _run(lambda t: M.gather_from_sequence_parallel(t, pstate=ps), rows[r], gs[r])
    _close(out, torch.cat(rows, dim=0))
    _close(grad, sum(gs).chunk(tp, dim=0)[r])               # reduce-scatter of the grads
    checked.append("gather_from_sequence_parallel(tp_grad=True)")

    out, grad = _run(lambda t: M.gather_from_sequence_parallel(t, tensor_parallel_output_grad=False, pstate=ps),
                     rows[r], gs[r])
    _close(out, torch.cat(rows, dim=0))
    _close(grad, gs[r].chunk(tp, dim=0)[r])                 # split only
    checked.append("gather_from_sequence_parallel(tp_grad=False)")

    out, grad = _run(lambda t: M.reduce_scatter_to_sequence_parallel(t, ps), xs[r], g_first[r])
    _close(out, sum(xs).chunk(tp, dim=0)[r])
    _close(grad, torch.cat(g_first, dim=0))
    checked.append("reduce_scatter_to_sequence_parallel")

    # The caller's tensors are never written by a collective.
    before = xs[r].clone()
    M.reduce_from_tp(xs[r], ps)
    assert torch.equal(xs[r], before)
    checked.append("no_inplace")
    return checked


EXPECTED = ["copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp", "scatter_to_sequence_parallel",
            "gather_from_sequence_parallel(tp_grad=True)", "gather_from_sequence_parallel(tp_grad=False)",
            "reduce_scatter_to_sequence_parallel", "no_inplace"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp", [2, 4])
def test_mappings_match_single_process_math(tp):
    for checked in run_distributed(_check_all_mappings, tp, timeout=100):
        assert checked == EXPECTED


def test_tp1_mappings_are_identities_without_distributed():
    ps = ParallelState()  # TP = 1, no process group: nothing may touch torch.distributed
    x = _full(0, S, B, H).requires_grad_(True)
    for fn in (M.copy_to_tp, M.reduce_from_tp, M.scatter_to_tp, M.gather_from_tp,
               M.scatter_to_sequence_parallel, M.reduce_scatter_to_sequence_parallel):
        assert fn(x, ps) is x
    assert M.gather_from_sequence_parallel(x, True, ps) is x


def test_uneven_split_is_refused():
    ps = ParallelState(tp_size=4, tp_rank=1)
    with pytest.raises(ValueError, match="not divisible by 4"):
        M.scatter_to_tp(torch.zeros(2, 6), ps)
