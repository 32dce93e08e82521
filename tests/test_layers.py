"""Parallel layers against nn.Linear / nn.Embedding built from the same full weights.

For each TP degree: the sharded parameters must be exactly (torch.equal) the slices of the TP=1
layer built with the same seed, and outputs, input grads and parameter grads must match the
single-process reference in fp32.
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_helpers import run_distributed
from megatron_lite.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    init_method_normal,
)
from megatron_lite.parallel.params import param_is_tp_duplicate
from megatron_lite.parallel.state import ParallelState, initialize_parallel

S, B, IN, OUT, VOCAB = 8, 2, 12, 16, 32  # all divisible by TP = 1, 2, 4


def _full(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _shard(t, ps, dim):
    return t.chunk(ps.tp_size, dim=dim)[ps.tp_rank]


def _reference_linear(weight, bias, x, grad):
    """nn.Linear with the given full weights: output, x.grad, weight.grad, bias.grad."""
    ref = nn.Linear(weight.size(1), weight.size(0))
    with torch.no_grad():
        ref.weight.copy_(weight)
        ref.bias.copy_(bias)
    x = x.clone().requires_grad_(True)
    out = ref(x)
    out.backward(grad)
    return out.detach(), x.grad, ref.weight.grad, ref.bias.grad


def _set_bias(layer, full_bias, ps, dim):
    """Biases start at zero; give them values so the bias path is exercised."""
    with torch.no_grad():
        layer.bias.copy_(full_bias if dim is None else _shard(full_bias, ps, dim))


def _check_column(ps, single, gather_output, sequence_parallel):
    x, grad = _full(1, S, B, IN), _full(2, S, B, OUT)
    full_bias = _full(3, OUT)
    layer = ColumnParallelLinear(IN, OUT, gather_output=gather_output, sequence_parallel=sequence_parallel,
                                 init_method=init_method_normal(0.02, seed=7), pstate=ps)
    assert torch.equal(layer.weight, _shard(single.weight, ps, 0))
    assert torch.equal(layer.bias, torch.zeros(OUT // ps.tp_size))
    assert layer.weight.tensor_model_parallel and layer.weight.partition_dim == 0
    _set_bias(layer, full_bias, ps, 0)
    ref_out, ref_dx, ref_dw, ref_db = _reference_linear(single.weight, full_bias, x, grad)

    x_in = _shard(x, ps, 0) if sequence_parallel else x
    x_in = x_in.clone().requires_grad_(True)
    out, out_bias = layer(x_in)
    assert out_bias is None
    if gather_output:
        _close(out, ref_out)
        out.backward(grad)
    else:
        _close(out, _shard(ref_out, ps, -1))
        out.backward(_shard(grad, ps, -1))
    _close(x_in.grad, _shard(ref_dx, ps, 0) if sequence_parallel else ref_dx)
    _close(layer.weight.grad, _shard(ref_dw, ps, 0))
    _close(layer.bias.grad, _shard(ref_db, ps, 0))


def _check_row(ps, single, input_is_parallel, sequence_parallel):
    x, grad = _full(11, S, B, OUT), _full(12, S, B, IN)
    full_bias = _full(13, IN)
    layer = RowParallelLinear(OUT, IN, input_is_parallel=input_is_parallel, sequence_parallel=sequence_parallel,
                              init_method=init_method_normal(0.02, seed=8), pstate=ps)
    assert torch.equal(layer.weight, _shard(single.weight, ps, 1))
    assert layer.weight.partition_dim == 1 and not layer.bias.tensor_model_parallel
    assert getattr(layer.bias, "sequence_parallel", False) == (sequence_parallel and ps.tp_size > 1)
    _set_bias(layer, full_bias, ps, None)
    ref_out, ref_dx, ref_dw, ref_db = _reference_linear(single.weight, full_bias, x, grad)

    x_in = (_shard(x, ps, -1) if input_is_parallel else x).clone().requires_grad_(True)
    out, _ = layer(x_in)
    if sequence_parallel:
        _close(out, _shard(ref_out, ps, 0))
        out.backward(_shard(grad, ps, 0))
    else:
        _close(out, ref_out)
        out.backward(grad)
    _close(x_in.grad, _shard(ref_dx, ps, -1) if input_is_parallel else ref_dx)
    _close(layer.weight.grad, _shard(ref_dw, ps, 1))
    bias_grad = layer.bias.grad.clone()
    if getattr(layer.bias, "sequence_parallel", False):
        dist.all_reduce(bias_grad, group=ps.tp_group)  # what the trainer does for such params
    _close(bias_grad, ref_db)


def _check_skip_bias_add(ps):
    """With skip_bias_add the layer returns (output without bias, bias); adding it gives the fused output."""
    col = ColumnParallelLinear(IN, OUT, skip_bias_add=True, pstate=ps)
    row = RowParallelLinear(OUT, IN, skip_bias_add=True, pstate=ps)
    _set_bias(col, _full(21, OUT), ps, 0)
    _set_bias(row, _full(22, IN), ps, None)
    x = _full(23, S, B, IN)
    with torch.no_grad():
        h, col_bias = col(x)
        y, row_bias = row(h + col_bias)
        assert col_bias is col.bias and row_bias is row.bias
        col.skip_bias_add = row.skip_bias_add = False
        h_fused, none1 = col(x)
        y_fused, none2 = row(h_fused)
    assert none1 is None and none2 is None
    _close(h + col_bias, h_fused)
    _close(y + row_bias, y_fused)


def _check_weight_override_and_deepcopy(ps):
    """forward(x, weight=...) uses the given shard (tied LM head); deepcopy shares the groups."""
    layer = ColumnParallelLinear(IN, OUT, bias=False, pstate=ps)
    tied_full = _full(41, OUT, IN).requires_grad_(True)
    tied = _shard(tied_full.detach(), ps, 0).clone().requires_grad_(True)
    x, grad = _full(42, S, B, IN), _full(43, S, B, OUT)
    out, _ = layer(x, weight=tied)
    ref = F.linear(x, tied_full)
    _close(out, _shard(ref.detach(), ps, -1))
    out.backward(_shard(grad, ps, -1))
    ref.backward(grad)
    _close(tied.grad, _shard(tied_full.grad, ps, 0))
    assert layer.weight.grad is None
    with pytest.raises(ValueError, match="weight shard"):
        layer(x, weight=torch.zeros(OUT + 1, IN))
    clone = copy.deepcopy(layer)
    assert clone.pstate is ps and torch.equal(clone.weight, layer.weight) and clone.weight is not layer.weight


def _check_embedding(ps, single):
    ids = torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(31))
    grad = _full(32, B, S, IN)
    layer = VocabParallelEmbedding(VOCAB, IN, init_method=init_method_normal(0.02, seed=9), pstate=ps)
    assert torch.equal(layer.weight, _shard(single.weight, ps, 0))
    ref = nn.Embedding(VOCAB, IN)
    with torch.no_grad():
        ref.weight.copy_(single.weight)
    ref_out = ref(ids)
    ref_out.backward(grad)
    out = layer(ids)
    assert out.shape == (B, S, IN)
    _close(out, ref_out.detach())
    out.backward(grad)
    _close(layer.weight.grad, _shard(ref.weight.grad, ps, 0))


def _check_layers(rank, world):
    ps = initialize_parallel(tensor=world) if world > 1 else ParallelState()
    single = ParallelState()  # the TP=1 layout, built in-process from the same seeds
    col1 = ColumnParallelLinear(IN, OUT, init_method=init_method_normal(0.02, seed=7), pstate=single)
    row1 = RowParallelLinear(OUT, IN, init_method=init_method_normal(0.02, seed=8), pstate=single)
    emb1 = VocabParallelEmbedding(VOCAB, IN, init_method=init_method_normal(0.02, seed=9), pstate=single)
    checked = []
    for gather_output in (False, True):
        _check_column(ps, col1, gather_output, sequence_parallel=False)
        checked.append(f"column(gather_output={gather_output})")
    _check_column(ps, col1, False, sequence_parallel=True)
    checked.append("column(sequence_parallel)")
    for input_is_parallel in (True, False):
        _check_row(ps, row1, input_is_parallel, sequence_parallel=False)
        checked.append(f"row(input_is_parallel={input_is_parallel})")
    _check_row(ps, row1, True, sequence_parallel=True)
    checked.append("row(sequence_parallel)")
    _check_skip_bias_add(ps)
    checked.append("skip_bias_add")
    _check_embedding(ps, emb1)
    checked.append("embedding")
    _check_weight_override_and_deepcopy(ps)
    checked.append("weight_override")
    # Grad clipping counts replicated params on TP rank 0 only; sharded params everywhere.
    assert not param_is_tp_duplicate(col1.weight, ps)
    assert param_is_tp_duplicate(row1.bias, ps) == (ps.tp_rank > 0)
    checked.append("duplicates")
    return checked


EXPECTED = ["column(gather_output=False)", "column(gather_output=True)", "column(sequence_parallel)",
            "row(input_is_parallel=True)", "row(input_is_parallel=False)", "row(sequence_parallel)",
            "skip_bias_add", "embedding", "weight_override", "duplicates"]


def test_layers_tp1_match_torch():
    assert _check_layers(0, 1) == EXPECTED


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp", [2, 4])
def test_layers_match_torch_and_shard_tp1_weights(tp):
    for checked in run_distributed(_check_layers, tp, timeout=100):
        assert checked == EXPECTED


def test_default_init_and_seeded_init():
    torch.manual_seed(0)
    a = ColumnParallelLinear(IN, OUT, pstate=ParallelState())
    torch.manual_seed(0)
    expected = torch.empty(OUT, IN).normal_(0.0, 0.02)
    assert torch.equal(a.weight, expected)  # default: N(0, 0.02) from torch's default generator
    # A seeded init ignores the default stream entirely.
    w1 = RowParallelLinear(OUT, IN, init_method=init_method_normal(0.5, seed=3), pstate=ParallelState()).weight
    torch.manual_seed(123)
    w2 = RowParallelLinear(OUT, IN, init_method=init_method_normal(0.5, seed=3), pstate=ParallelState()).weight
    assert torch.equal(w1, w2)
    assert abs(float(w1.detach().std()) - 0.5) < 0.1


def test_indivisible_sizes_are_refused():
    with pytest.raises(ValueError, match="not divisible by 4"):
        ColumnParallelLinear(IN, 6, pstate=ParallelState(tp_size=4))
    with pytest.raises(ValueError, match="sequence_parallel"):
        ColumnParallelLinear(IN, OUT, gather_output=True, sequence_parallel=True, pstate=ParallelState())
