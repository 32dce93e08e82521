"""Pipeline schedules: their (micro-batch, chunk, F/B) orders, and runs of a toy layer chain
over gloo ranks that must reproduce single-process gradient accumulation exactly.

The toy chain (tanh(h @ W_l) for l in 0..L-1, squared error at the end) keeps the schedule and
p2p logic apart from the GPT model; tests/test_pipeline_parity.py runs the real model.
"""
import time

import pytest
import torch

from dist_helpers import run_distributed
from megatron_lite.parallel import schedule_orders as so
from megatron_lite.parallel.schedule_orders import ScheduleError, Step, max_in_flight, schedule_order


# ---- orders, no ranks ------------------------------------------------------------------------
def F(mb, c=0):
    return Step("F", mb, c)


def B(mb, c=0):
    return Step("B", mb, c)


def test_gpipe_order_is_all_forward_then_all_backward():
    assert so.gpipe_order(4, 2, 3) == [F(0), F(1), F(2), B(0), B(1), B(2)]
    assert max_in_flight(so.gpipe_order(4, 0, 8)) == 8


@pytest.mark.parametrize("pp,m", [(2, 2), (4, 4), (4, 8), (3, 7)])
def test_1f1b_warmup_and_in_flight_bound(pp, m):
    for rank in range(pp):
        order = so.one_f_one_b_order(pp, rank, m)
        warmup = pp - rank - 1
        assert order[:warmup] == [F(i) for i in range(warmup)]
        assert order[warmup] == F(warmup)
        if warmup < m:
            assert order[warmup + 1] == B(0)  # first backward right after the first steady forward
        assert max_in_flight(order) == min(pp - rank, m)
        assert sorted(order) == sorted([F(i) for i in range(m)] + [B(i) for i in range(m)])
        # backwards run in micro-batch order, each after its own forward
        assert [s.microbatch for s in order if s.kind == "B"] == list(range(m))
    assert so.one_f_one_b_order(4, 3, 3) == [F(0), B(0), F(1), B(1), F(2), B(2)]


def test_interleaved_order_small_case_by_hand():
    # pp=2, v=2, m=4 on rank 0: warm-up (2-0-1)*2 + (2-1)*2 = 4 forwards:
    # chunk 0 takes micro-batches 0,1, then chunk 1 takes 0,1 (groups of pp micro-batches).
    expect_rank0 = [F(0, 0), F(1, 0), F(0, 1), F(1, 1),
                    F(2, 0), B(0, 1), F(3, 0), B(1, 1), F(2, 1), B(0, 0), F(3, 1), B(1, 0),
                    B(2, 1), B(3, 1), B(2, 0), B(3, 0)]
    assert so.interleaved_order(2, 0, 4, 2) == expect_rank0
    # rank 1 (last): warm-up (2-1-1)*2 + 2 = 2
    expect_rank1 = [F(0, 0), F(1, 0),
                    F(0, 1), B(0, 1), F(1, 1), B(1, 1), F(2, 0), B(0, 0), F(3, 0), B(1, 0),
                    F(2, 1), B(2, 1), F(3, 1), B(3, 1), B(2, 0), B(3, 0)]
    assert so.interleaved_order(2, 1, 4, 2) == expect_rank1
    # m == pp: everything is warm-up (Megatron's all_warmup_microbatches)
    assert so.interleaved_order(2, 1, 2, 2)[:4] == [F(0, 0), F(1, 0), F(0, 1), F(1, 1)]


def test_interleaved_chunk_ids_match_megatron():
    # Megatron: chunk = (k % (pp*v)) // pp, reversed for backward
    assert [so.interleaved_chunk_id(k, 2, 3, True) for k in range(8)] == [0, 0, 1, 1, 2, 2, 0, 0]
    assert [so.interleaved_chunk_id(k, 2, 3, False) for k in range(8)] == [2, 2, 1, 1, 0, 0, 2, 2]
    assert [so.interleaved_microbatch_id(k, 2, 3) for k in range(8)] == [0, 1, 0, 1, 0, 1, 2, 3]


def test_microbatch_count_errors_name_the_flags():
    with pytest.raises(ScheduleError, match="--global-batch-size"):
        so.check_microbatches(0, 4, "1f1b")
    so.check_microbatches(3, 4, "1f1b")  # fewer than the stages: allowed, as in Megatron-LM
    so.check_microbatches(1, 4, "gpipe")
    with pytest.raises(ScheduleError, match="multiple of --pipeline-model-parallel-size"):
        so.check_microbatches(3, 4, "interleaved", 2)
    with pytest.raises(ScheduleError, match="multiple of --pipeline-model-parallel-size"):
        so.check_microbatches(6, 4, "interleaved", 2)
    so.check_microbatches(8, 4, "interleaved", 2)
    with pytest.raises(ScheduleError, match="unknown"):
        schedule_order("zb", 2, 0, 4)


# ---- a toy layer chain -----------------------------------------------------------------------
H, S, MB = 8, 4, 2  # hidden, seq, micro-batch


class ToyChunk(torch.nn.Module):
    """Layers [first, first + n) of the toy chain; the input comes from set_input_tensor."""

    def __init__(self, weights, first, n):
        super().__init__()
        self.first = first
        self.w = torch.nn.ParameterList([torch.nn.Parameter(weights[i].clone()) for i in range(first, first + n)])
        self.input_tensor = None

    def set_input_tensor(self, t):
        self.input_tensor = t

    def forward(self, x):
        h = x if x is not None else self.input_tensor
        for w in self.w:
            h = h + torch.tanh(h @ w)
        return h


def _toy_data(num_layers, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(H, H, generator=g) / H ** 0.5 for _ in range(num_layers)]
    batches = [(torch.randn(S, MB, H, generator=g), torch.randn(S, MB, H, generator=g)) for _ in range(m)]
    return weights, batches


def _toy_reference(weights, batches):
    ws = [w.clone().requires_grad_(True) for w in weights]
    losses = []
    for x, y in batches:
        h = x
        for w in ws:
            h = h + torch.tanh(h @ w)
        loss = ((h - y) ** 2).mean()
        (loss / len(batches)).backward()
        losses.append(loss.item())
    return losses, [w.grad for w in ws]


def _toy_step_func(ps):
    def step(it, model):
        x, y = next(it)
        # The chunk knows whether it holds the first layer (as GPTModel knows pre_process).
        out = model(x if model.first == 0 else None)

        def loss_func(o, non_loss_data=False):
            if non_loss_data:
                return o.detach().sum()
            loss = ((o - y) ** 2).mean()
            return loss, {"lm loss": loss.detach()}
        return out, loss_func
    return step


# ---- no pipelining and the shared pieces, one process ---------------------------------------------
class SyncRecorder(ToyChunk):
    """Records, for each weight-gradient computation, whether DP sync was deferred (no_sync)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.deferred, self.seen = False, []
        for w in self.w:
            w.register_hook(lambda g: self.seen.append(self.deferred) or g)

    def no_sync(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.deferred = True
            yield
            self.deferred = False
        return ctx()


def test_no_pipelining_accumulates_scales_and_defers_sync():
    from megatron_lite.parallel.schedules import ScheduleStats, get_forward_backward_func
    from megatron_lite.parallel.state import ParallelState
    weights, batches = _toy_data(3, 4)
    ref_losses, ref_grads = _toy_reference(weights, batches)
    ps = ParallelState()
    fb = get_forward_backward_func(ps)
    assert fb.__name__ == "forward_backward_no_pipelining"
    model, stats = SyncRecorder(weights, 0, 3), ScheduleStats()
    out = fb(forward_step_func=_toy_step_func(ps), data_iterator=iter(batches), model=[model],
             num_microbatches=4, grad_scale=2.0, stats=stats)
    assert [d["lm loss"].item() for d in out] == pytest.approx(ref_losses, rel=1e-6)
    for w, g in zip(model.w, ref_grads):
        torch.testing.assert_close(w.grad, 2.0 * g)
    assert model.seen == [True] * 9 + [False] * 3  # only the last micro-batch's backward syncs
    assert stats.order == [s for i in range(4) for s in (F(i), B(i))]
    assert stats.peak_live_microbatches == 1
    # forward only: losses, no grads; non-loss data collects what loss_func returns for it
    model.zero_grad(set_to_none=True)
    out = fb(forward_step_func=_toy_step_func(ps), data_iterator=iter(batches), model=model,
             num_microbatches=4, forward_only=True, collect_non_loss_data=True)
    assert all(w.grad is None for w in model.w) and len(out) == 4 and out[0].dim() == 0


def test_deallocate_keeps_outputs_their_own_backward_needs():
    from megatron_lite.parallel.schedules import backward_step, deallocate_output_tensor
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.tanh(x * 2)  # TanhBackward saves its result: freeing it would corrupt the gradient
    deallocate_output_tensor(y)
    assert y.numel() == 12
    z = x * 2 + 1  # AddBackward saves nothing: the data can go
    deallocate_output_tensor(z)
    assert z.numel() == 1
    dz = torch.ones(3, 4)
    x2 = x.detach().requires_grad_(True)
    assert backward_step(x2, z, dz) is None  # x is not the input tensor here
    torch.testing.assert_close(x.grad, 2 * dz)


def _toy_run(ps, schedule, m, vp=1, layers_per_chunk=1, forward_only=False, scale=None):
    from megatron_lite.parallel.schedules import ScheduleStats, get_forward_backward_func
    num_layers = ps.pp_size * vp * layers_per_chunk
    weights, batches = _toy_data(num_layers, m)
    ps.virtual_pp_size = vp if schedule == "interleaved" else None
    chunks = [ToyChunk(weights, (c * ps.pp_size + ps.pp_rank) * layers_per_chunk, layers_per_chunk)
              for c in range(vp)]
    stats = ScheduleStats()
    fb = get_forward_backward_func(ps, schedule)
    losses = fb(forward_step_func=_toy_step_func(ps), data_iterator=iter(batches),
                model=chunks if vp > 1 else chunks[0], num_microbatches=m, seq_length=S,
                micro_batch_size=MB, hidden_size=H, pstate=ps, forward_only=forward_only, stats=stats,
                grad_scale=(lambda loss: loss * scale) if scale else None)
    grads = {}
    if not forward_only:
        for c in chunks:
            for i, w in enumerate(c.w):
                grads[c.first + i] = w.grad.clone()
    return dict(losses=[d["lm loss"].item() for d in losses], grads=grads, order=list(stats.order),
                peak_live=stats.peak_live_microbatches, peak_bytes=stats.peak_activation_bytes,
                pp_rank=ps.pp_rank, vp=vp, num_layers=num_layers, m=m, schedule=schedule, scale=scale or 1.0)


def _toy_worker(rank, world):
    from megatron_lite.parallel.state import initialize_parallel
    out = []
    ps = initialize_parallel(pipeline=4)
    # Micro-batch counts a schedule refuses: every rank raises before any transfer, and the next run
    # is unaffected.
    from megatron_lite.parallel.schedules import get_forward_backward_func
    for schedule, m in (("1f1b", 0), ("gpipe", 0), ("interleaved", 6)):
        vp = 2 if schedule == "interleaved" else 1
        ps.virtual_pp_size = vp if vp > 1 else None
        try:
            get_forward_backward_func(ps, schedule)(
                forward_step_func=None, data_iterator=None, model=[torch.nn.Linear(1, 1)] * vp,
                num_microbatches=m, seq_length=S, micro_batch_size=MB, hidden_size=H, pstate=ps)
            out.append(("no error", schedule))
        except ScheduleError as e:
            out.append(("error", str(e)))
    for schedule, m, vp, lpc in (("gpipe", 8, 1, 1), ("1f1b", 8, 1, 1), ("1f1b", 5, 1, 2),
                                 ("gpipe", 2, 1, 1), ("1f1b", 2, 1, 1), ("1f1b", 1, 1, 1),  # m < PP
                                 ("interleaved", 8, 2, 1), ("interleaved", 4, 2, 1), ("interleaved", 8, 3, 1)):
        out.append(_toy_run(ps, schedule, m, vp, lpc))
    for schedule, vp in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        out.append(_toy_run(ps, schedule, 8, vp, forward_only=True))
    out.append(_toy_run(ps, "interleaved", 4, 2, scale=8.0))  # fp16-style loss scaling
    ps = initialize_parallel(pipeline=2)  # PP=2 x DP=2 on the same four ranks
    for schedule, m, vp in (("gpipe", 4, 1), ("1f1b", 3, 1), ("interleaved", 6, 2), ("interleaved", 2, 2)):
        out.append(_toy_run(ps, schedule, m, vp, 2))
    return out


@pytest.mark.timeout(120)
def test_toy_pipeline_matches_single_process():
    results = run_distributed(_toy_worker, 4, timeout=110)
    for rank_out in results:
        errors = rank_out[:3]
        assert all(kind == "error" for kind, _ in errors), errors
        assert "micro-batches" in errors[0][1]
    runs = [r for r in zip(*[ro[3:] for ro in results])]  # per configuration: one result per rank
    for per_rank in runs:
        cfg = per_rank[0]
        weights, batches = _toy_data(cfg["num_layers"], cfg["m"])
        ref_losses, ref_grads = _toy_reference(weights, batches)
        pp = 4 if per_rank[-1]["pp_rank"] == 3 else 2
        seen = {}
        for r in per_rank:
            last = r["pp_rank"] == pp - 1
            assert (len(r["losses"]) > 0) == last
            if last:
                assert r["losses"] == pytest.approx(ref_losses, rel=1e-6), cfg["schedule"]
            for layer, g in r["grads"].items():
                torch.testing.assert_close(g, ref_grads[layer] * r["scale"], rtol=1e-5, atol=1e-6)
                seen[layer] = True
            expect = schedule_order(r["schedule"], pp, r["pp_rank"], r["m"], r["vp"],
                                    forward_only=not r["grads"])
            assert r["order"] == expect, (r["schedule"], r["pp_rank"])
            if r["schedule"] == "gpipe":
                assert r["peak_live"] == r["m"]
            elif r["schedule"] == "1f1b" and r["grads"]:
                assert r["peak_live"] == min(pp - r["pp_rank"], r["m"])
        if per_rank[0]["grads"]:
            assert len(seen) == cfg["num_layers"]  # every layer of the model was checked
    # Activation memory on stage 0 at m=8, PP=4: 1F1B holds 4 micro-batches, GPipe all 8.
    gpipe0, f1b0 = runs[0][0], runs[1][0]
    assert gpipe0["peak_live"] == 8 and f1b0["peak_live"] == 4
    assert 0 < f1b0["peak_bytes"] < gpipe0["peak_bytes"]
    assert f1b0["peak_bytes"] * 2 == gpipe0["peak_bytes"]  # same bytes per micro-batch


def _failing_worker(rank, world):
    from megatron_lite.parallel.schedules import get_forward_backward_func
    from megatron_lite.parallel.state import initialize_parallel
    ps = initialize_parallel(pipeline=2, timeout_minutes=0.03)  # 1.8 s
    if rank == 1:
        # This stage fails before its first receive and stays alive: rank 0 must not wait forever.
        time.sleep(4)
        return "rank 1 failed early"
    weights, batches = _toy_data(2, 4)
    start = time.monotonic()
    try:
        get_forward_backward_func(ps, "1f1b")(
            forward_step_func=_toy_step_func(ps), data_iterator=iter(batches), model=ToyChunk(weights, 0, 1),
            num_microbatches=4, seq_length=S, micro_batch_size=MB, hidden_size=H, pstate=ps)
    except RuntimeError as e:
        return ("error", type(e).__name__, str(e), time.monotonic() - start)
    return ("no error",)


@pytest.mark.timeout(60)
def test_failed_stage_does_not_hang_its_neighbour():
    r0, r1 = run_distributed(_failing_worker, 2, timeout=50)
    assert r0[0] == "error", r0
    assert r0[1] == "P2PError" and "--distributed-timeout-minutes" in r0[2]
    assert r0[3] < 30.0  # the 1.8 s group timeout fired (slack for a loaded 2-core machine), not the peer


def _config_error_worker(rank, world):
    """Rank 1 is given a micro-batch count its schedule refuses; it raises before any transfer and
    leaves (its process group goes away as a dead process's would). Rank 0 must end with an error."""
    from megatron_lite.parallel.schedule_orders import ScheduleError
    from megatron_lite.parallel.schedules import get_forward_backward_func
    from megatron_lite.parallel.state import destroy_parallel, initialize_parallel
    ps = initialize_parallel(pipeline=2, timeout_minutes=0.5)
    weights, batches = _toy_data(2, 4)
    num_microbatches = 4 if rank == 0 else 0  # refused on rank 1 before any transfer
    start = time.monotonic()
    try:
        get_forward_backward_func(ps, "1f1b")(
            forward_step_func=_toy_step_func(ps), data_iterator=iter(batches),
            model=ToyChunk(weights, rank, 1), num_microbatches=num_microbatches, seq_length=S,
            micro_batch_size=MB, hidden_size=H, pstate=ps)
    except ScheduleError as e:
        destroy_parallel()
        return ("config error", str(e))
    except RuntimeError as e:
        return ("error", type(e).__name__, str(e), time.monotonic() - start)
    return ("no error",)


@pytest.mark.timeout(90)
def test_config_error_on_one_rank_ends_the_other_with_an_error():
    r0, r1 = run_distributed(_config_error_worker, 2, timeout=80)
    assert r1[0] == "config error" and "micro-batches" in r1[1], r1
    assert r0[0] == "error", r0
    assert r0[3] < 60.0, r0
