"""Tensor-parallel GPT against the single-process model (gloo, fp32).

Every rank builds the TP=1 reference itself (same seed), then the TP model, and checks for each
variant (sequence parallel on/off, recompute off/full/selective, RoPE, untied head, document mask):
  * each TP parameter is exactly this rank's shard of the reference parameter;
  * one forward + backward gives the reference loss and, after the trainer's TP all-reduce of
    sequence-parallel grads, every gradient equals the reference gradient's shard.
With dropout on: a reseeded rerun repeats the loss bit for bit, and recompute (full or
selective) reproduces the losses and gradients of the run without it.
"""
import pytest
import torch
import torch.distributed as dist

from dist_helpers import run_distributed
from megatron_lite.config import ModelConfig
from megatron_lite.model import GPTModel, get_ltor_masks_and_position_ids
from megatron_lite.parallel.random import model_parallel_seed
from megatron_lite.parallel.state import ParallelState, initialize_parallel

B, S, V, EOD, SEED = 2, 16, 256, 0, 1234
RECOMPUTE = {
    None: {},
    "uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    "selective": dict(recompute_granularity="selective"),
}
# (sequence_parallel, recompute, extra ModelConfig fields, document mask)
VARIANTS = [
    (False, None, {}, False),
    (True, None, {}, False),
    (False, "uniform", {}, False),
    (True, "uniform", {}, False),
    (False, "selective", {}, False),
    (True, "selective", {}, False),
    (False, None, dict(untie_embeddings_and_output_weights=True), True),
    (True, "block", dict(position_embedding_type="rope", untie_embeddings_and_output_weights=True), True),
]
# Parameters split over TP ranks, and along which dim; everything else is replicated.
SPLIT_DIM = {"query_key_value.weight": 0, "query_key_value.bias": 0, "dense_h_to_4h.weight": 0,
             "dense_h_to_4h.bias": 0, "word_embeddings.weight": 0, "output_layer.weight": 0,
             "self_attention.dense.weight": 1, "dense_4h_to_h.weight": 1}


def _cfg(dropout=0.0, **kw) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=S, vocab_size=V,
                       padded_vocab_size=V, hidden_dropout=dropout, attention_dropout=dropout, **kw)


def _batch(with_mask):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (B, S), generator=gen)
    labels = torch.randint(0, V, (B, S), generator=gen)
    if with_mask:
        ids[0, 4], ids[1, 9] = EOD, EOD
    mask, _, pos = get_ltor_masks_and_position_ids(ids, EOD, with_mask, with_mask, False)
    return ids, pos, mask, labels


def _shard(t, name, ps):
    dim = next((d for suffix, d in SPLIT_DIM.items() if name.endswith(suffix)), None)
    return t if dim is None else t.chunk(ps.tp_size, dim=dim)[ps.tp_rank]


def _step(model, batch, ps=None, seed=None):
    """Forward + backward of the mean loss; grads with sequence-parallel ones all-reduced over TP."""
    if seed is not None:
        model_parallel_seed(seed, ps)
    model.zero_grad(set_to_none=True)
    ids, pos, mask, labels = batch
    loss = model(ids, pos, mask, labels=labels)
    loss.mean().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if ps is not None and ps.tp_size > 1 and getattr(p, "sequence_parallel", False):
            dist.all_reduce(g, group=ps.tp_group)
        grads[name] = g
    return loss.detach(), grads


def _close(actual, expected, full, what):
    """Relative error on norms, plus an elementwise check with atol scaled to the whole grad's size
    (``full``: a shard's exact-zero-in-theory entries, like the key bias, are pure rounding noise)."""
    scale = float(full.norm()) + 1e-30
    rel = float((actual - expected).norm()) / scale
    assert rel <= 1e-5, f"{what}: relative error {rel:.2e}"
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(full.abs().max()), msg=what)


def _parity_rank(rank, world):
    ps = initialize_parallel(tensor=world)
    single = ParallelState()  # TP=1 on this process: the reference
    checked = []
    for sp, recompute, extra, with_mask in VARIANTS:
        tag = f"tp{world} sp={sp} recompute={recompute} {sorted(extra)} mask={with_mask}"
        batch = _batch(with_mask)
        ref = GPTModel(_cfg(**extra), single, seed=SEED)
        model = GPTModel(_cfg(sequence_parallel=sp, **RECOMPUTE[recompute], **extra), ps, seed=SEED)
        ref_params = dict(ref.named_parameters())
        assert [n for n, _ in model.named_parameters()] == list(ref_params), tag
        for name, p in model.named_parameters():
            assert torch.equal(p, _shard(ref_params[name], name, ps)), f"{tag}: {name} is not the shard"
            if sp and "layernorm" in name:
                assert p.sequence_parallel, f"{tag}: {name} must be marked sequence_parallel"

        ref_loss, ref_grads = _step(ref, batch)
        loss, grads = _step(model, batch, ps)
        _close(loss, ref_loss, ref_loss, f"{tag}: loss")
        for name, g in grads.items():
            _close(g, _shard(ref_grads[name], name, ps), ref_grads[name], f"{tag}: grad of {name}")
        checked.append(tag)
    return checked + _dropout_checks(ps)


def _dropout_checks(ps):
    checked = []
    batch = _batch(False)
    for sp in (False, True):
        plain = GPTModel(_cfg(0.1, sequence_parallel=sp), ps, seed=SEED)
        loss1, grads1 = _step(plain, batch, ps, seed=7)
        loss2, _ = _step(plain, batch, ps, seed=7)
        assert torch.equal(loss1, loss2), f"sp={sp}: same seed, different dropout"
        plain.eval()
        with torch.no_grad():
            assert not torch.equal(plain(*batch[:3], labels=batch[3]), loss1), "dropout did nothing"
        plain.train()
        for recompute in ("uniform", "selective"):
            model = GPTModel(_cfg(0.1, sequence_parallel=sp, **RECOMPUTE[recompute]), ps, seed=SEED)
            loss, grads = _step(model, batch, ps, seed=7)
            assert torch.equal(loss, loss1), f"sp={sp} recompute={recompute}: loss differs"
            for name, g in grads.items():
                torch.testing.assert_close(g, grads1[name], rtol=1e-6, atol=1e-7 * float(grads1[name].abs().max()),
                                           msg=f"sp={sp} recompute={recompute}: grad of {name}")
            checked.append(f"dropout sp={sp} recompute={recompute}")

        # Replicated activations (no SP) must get the same dropout mask on every TP rank; sequence
        # shards (SP) each need their own, or every chunk of the sequence would share one mask.
        model_parallel_seed(7, ps)
        with torch.no_grad():
            dropped = plain.embedding(batch[0], batch[1]) == 0
            hidden = GPTModel(_cfg(0.1, sequence_parallel=sp), ps, seed=SEED, post_process=False)(*batch[:3])
        masks, hiddens = _all_gather(dropped.to(torch.uint8), ps), _all_gather(hidden, ps)
        assert masks[0].sum() > 0
        same = all(torch.equal(m, masks[0]) for m in masks)
        assert same != sp, f"sp={sp}: embedding dropout masks {'differ' if not sp else 'repeat'} across TP ranks"
        if not sp:
            assert all(torch.equal(h, hiddens[0]) for h in hiddens), "replicated hidden states diverged"
        checked.append(f"dropout masks sp={sp}")
    return checked


def _all_gather(t, ps):
    out = [torch.empty_like(t) for _ in range(ps.tp_size)]
    dist.all_gather(out, t.contiguous(), group=ps.tp_group)
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_model_matches_single_process(tp):
    results = run_distributed(_parity_rank, tp, timeout=220)
    assert all(r == results[0] for r in results)
    assert len(results[0]) == len(VARIANTS) + 6
