"""GPT model on one process: shapes, causality, document masks, attention backends, RoPE,
pipeline-stage layout and stage-able init, FLOPs and parameter counts (fp32, dropout 0)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from megatron_lite.config import Config, ModelConfig, ParallelConfig, TrainConfig
from megatron_lite.model import (GPTModel, build_model_chunks, count_parameters, get_ltor_masks_and_position_ids,
                                 layers_for_stage, num_floating_point_operations, resolve_attention_backend)
from megatron_lite.model.flops import recomputed_layer_count
from megatron_lite.model.rotary import RotaryEmbedding, apply_rotary_pos_emb
from megatron_lite.parallel.state import ParallelState

B, S, V, EOD = 2, 16, 256, 0
BACKENDS = ["unfused", "fused_softmax", "sdpa"]


def tiny(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=S, vocab_size=V,
                padded_vocab_size=V, hidden_dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def tokens(seed=0, b=B, s=S):
    return torch.randint(1, V, (b, s), generator=torch.Generator().manual_seed(seed))


def close(actual, expected, rel=1e-5):
    scale = float(expected.detach().abs().max()) + 1e-30
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def loss_and_grads(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels, **kw)
    loss.mean().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_shapes_loss_and_parameter_count():
    cfg = tiny()
    model = GPTModel(cfg, ParallelState())
    ids, labels = tokens(0), tokens(1)
    loss = model(ids, labels=labels)
    assert loss.shape == (B, S) and loss.dtype == torch.float32
    logits = model(ids)
    assert logits.shape == (B, S, V)
    # The loss is the plain cross entropy of the logits.
    close(loss, F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(B, S))
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)
    untied = tiny(untie_embeddings_and_output_weights=True, position_embedding_type="rope")
    assert sum(p.numel() for p in GPTModel(untied, ParallelState()).parameters()) == count_parameters(untied)
    hidden = GPTModel(cfg, ParallelState(), post_process=False)(ids)
    assert hidden.shape == (S, B, cfg.hidden_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal(backend):
    model = GPTModel(tiny(attention_backend=backend), ParallelState())
    ids, labels = tokens(0), tokens(1)
    base = model(ids, labels=labels).detach()
    t = 9
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 7) % V
    after = model(changed, labels=labels).detach()
    assert torch.equal(after[:, :t], base[:, :t])  # earlier positions cannot see token t
    assert (after[:, t:] - base[:, t:]).abs().max() > 1e-4


def test_ltor_masks_by_hand():
    batch = torch.tensor([[5, 6, EOD, 7, 8, EOD, 9, 3],
                          [EOD, 1, 2, 3, 4, 5, 6, 7]])
    mask, loss_mask, pos = get_ltor_masks_and_position_ids(batch, EOD, False, False, False)
    assert mask is None
    assert torch.equal(loss_mask, torch.ones(2, 8))
    assert torch.equal(pos, torch.arange(8).expand(2, 8))

    mask, loss_mask, pos = get_ltor_masks_and_position_ids(batch, EOD, True, True, True)
    assert torch.equal(pos, torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]))
    assert torch.equal(loss_mask, torch.tensor([[1., 1, 0, 1, 1, 0, 1, 1], [0., 1, 1, 1, 1, 1, 1, 1]]))
    # Document ids: the EOD closes its document. Query i may see key j iff j <= i, same document.
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1]])
    i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
    allowed = (j <= i) & (docs[:, :, None] == docs[:, None, :])
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    assert torch.equal(mask[:, 0], ~allowed)

    # Each option alone.
    mask, _, pos = get_ltor_masks_and_position_ids(batch, EOD, False, True, False)
    assert torch.equal(pos, torch.arange(8).expand(2, 8)) and torch.equal(mask[:, 0], ~allowed)
    mask, loss_mask, pos = get_ltor_masks_and_position_ids(batch, EOD, True, False, False)
    assert mask is None and torch.equal(loss_mask, torch.ones(2, 8)) and pos[0, 3] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_mask_makes_packed_documents_independent(backend):
    """With --reset-attention-mask --reset-position-ids, the second packed document's losses are
    those of the document run on its own."""
    model = GPTModel(tiny(attention_backend=backend), ParallelState())
    ids, labels = tokens(0, b=1), tokens(1, b=1)
    k = 6
    ids[0, k - 1] = EOD
    mask, _, pos = get_ltor_masks_and_position_ids(ids, EOD, True, True, False)
    packed = model(ids, pos, mask, labels=labels).detach()
    alone = model(ids[:, k:], labels=labels[:, k:]).detach()
    close(packed[:, k:], alone)
    causal_only = model(ids, labels=labels).detach()
    assert (causal_only[:, k:] - alone).abs().max() > 1e-4  # without the mask they do interact


@pytest.mark.parametrize("use_mask", [False, True])
def test_attention_backends_agree(use_mask):
    ids, labels = tokens(0), tokens(1)
    ids[:, 5] = EOD
    mask, _, pos = get_ltor_masks_and_position_ids(ids, EOD, use_mask, use_mask, False)
    results = {}
    for backend in BACKENDS:
        model = GPTModel(tiny(attention_backend=backend), ParallelState())
        assert model.attention_backend == backend
        results[backend] = loss_and_grads(model, ids, labels, position_ids=pos, attention_mask=mask)
    ref_loss, ref_grads = results["unfused"]
    for backend in ("fused_softmax", "sdpa"):
        loss, grads = results[backend]
        close(loss, ref_loss)
        for name, g in ref_grads.items():
            close(grads[name], g)
    assert resolve_attention_backend(tiny(attention_backend="auto")) == "sdpa"
    with pytest.raises(ValueError, match="--attention-backend"):
        resolve_attention_backend(tiny(attention_backend="flash"))


def test_rope():
    cfg = tiny(position_embedding_type="rope")
    model = GPTModel(cfg, ParallelState())
    assert model.embedding.position_embeddings is None
    ids, labels = tokens(0), tokens(1)
    pos = torch.arange(S).expand(B, S)
    loss, grads = loss_and_grads(model, ids, labels, position_ids=pos)
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads.values())
    # RoPE encodes relative positions only: shifting every position leaves the loss unchanged...
    shifted = model(ids, pos + 5, labels=labels).detach()
    close(shifted, loss, rel=1e-4)
    # ...while the rotation itself is not trivial, and preserves norms.
    q = torch.randn(S, B, 4, 16)
    angles = RotaryEmbedding(16)(pos)
    rotated = apply_rotary_pos_emb(q, angles)
    close(rotated[0], q[0])  # position 0: identity
    assert (rotated[1:] - q[1:]).abs().max() > 1e-2
    close(rotated.norm(dim=-1), q.norm(dim=-1))


@pytest.mark.parametrize("num_layers,pp,first,last,vp,expected", [
    (8, 1, None, None, None, [(0, 8)]),
    (8, 4, None, None, None, [(0, 2), (2, 2), (4, 2), (6, 2)]),
    (10, 4, 1, None, None, [(0, 1), (1, 3), (4, 3), (7, 3)]),
    (10, 4, None, 1, None, [(0, 3), (3, 3), (6, 3), (9, 1)]),
    (8, 4, 1, 1, None, [(0, 1), (1, 3), (4, 3), (7, 1)]),
    (5, 2, 2, 3, None, [(0, 2), (2, 3)]),
])
def test_layers_for_stage(num_layers, pp, first, last, vp, expected):
    assert [layers_for_stage(num_layers, pp, r, first, last, vp) for r in range(pp)] == expected


def test_layers_for_stage_interleaved():
    # Megatron's example: 8 layers, 2 stages, 4 chunks -> stage 0: [0] [2] [4] [6]; stage 1: [1] [3] [5] [7].
    assert [layers_for_stage(8, 2, 0, vp_size=4, vp_rank=v) for v in range(4)] == [(0, 1), (2, 1), (4, 1), (6, 1)]
    assert [layers_for_stage(8, 2, 1, vp_size=4, vp_rank=v) for v in range(4)] == [(1, 1), (3, 1), (5, 1), (7, 1)]
    # 8 layers, 2 stages, 2 chunks -> stage 0: [0,1] [4,5]; stage 1: [2,3] [6,7].
    assert [layers_for_stage(8, 2, p, vp_size=2, vp_rank=v) for p in range(2) for v in range(2)] == \
        [(0, 2), (4, 2), (2, 2), (6, 2)]
    for bad in [dict(num_layers=7, pp_size=2, pp_rank=0), dict(num_layers=8, pp_size=2, pp_rank=2),
                dict(num_layers=8, pp_size=2, pp_rank=0, first=1, vp_size=2),
                dict(num_layers=8, pp_size=4, pp_rank=1, first=2, last=1)]:
        with pytest.raises(ValueError):
            layers_for_stage(**bad)


def test_pipeline_stages_start_from_the_full_model_and_chain_to_its_loss():
    """Two stages built on their own (seeded by global names) hold exactly the full model's weights,
    and stage 0 -> stage 1 gives the full model's loss and (summed tied-embedding) grads."""
    cfg = tiny(num_layers=4)
    full = GPTModel(cfg, ParallelState())
    first = GPTModel(cfg, ParallelState(), pre_process=True, post_process=False, layer_offset=0, num_layers=1)
    last = GPTModel(cfg, ParallelState(), pre_process=False, post_process=True, layer_offset=1, num_layers=3)
    full_params = dict(full.named_parameters())

    def global_name(name, offset):
        if name.startswith("decoder.layers."):
            idx, rest = name[len("decoder.layers."):].split(".", 1)
            return f"decoder.layers.{int(idx) + offset}.{rest}"
        return name.replace("word_embeddings_for_head", "embedding.word_embeddings")

    for stage, offset in ((first, 0), (last, 1)):
        for name, p in stage.named_parameters():
            assert torch.equal(p, full_params[global_name(name, offset)]), name
    assert first.embedding.word_embeddings.weight.shared_embedding
    assert last.word_embeddings_for_head.weight.shared_embedding
    assert not hasattr(full.embedding.word_embeddings.weight, "shared_embedding")

    ids, labels = tokens(0), tokens(1)
    ref_loss, ref_grads = loss_and_grads(full, ids, labels)
    hidden = first(ids)
    sent = hidden.detach().requires_grad_(True)  # what p2p would deliver
    last.set_input_tensor([sent])
    loss = last(ids, labels=labels)
    loss.mean().backward()
    hidden.backward(sent.grad)
    close(loss.detach(), ref_loss)
    for stage, offset in ((first, 0), (last, 1)):
        for name, p in stage.named_parameters():
            if "word_embeddings" not in name:
                close(p.grad, ref_grads[global_name(name, offset)])
    tied = first.embedding.word_embeddings.weight.grad + last.word_embeddings_for_head.weight.grad
    close(tied, ref_grads["embedding.word_embeddings.weight"])


def test_build_model_chunks_interleaved():
    cfg = Config(model=tiny(num_layers=8), train=TrainConfig(seed=7),
                 parallel=ParallelConfig(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=2))
    layout = {}
    for pp_rank in range(2):
        chunks = build_model_chunks(cfg, ParallelState(pp_size=2, pp_rank=pp_rank))
        layout[pp_rank] = [(c.layer_offset, len(c.decoder.layers), c.pre_process, c.post_process) for c in chunks]
    assert layout == {0: [(0, 2, True, False), (4, 2, False, False)],
                      1: [(2, 2, False, False), (6, 2, False, True)]}
    # Chunk 1 of stage 1 holds global layers 6, 7 of the single-stage model with the same seed.
    full = GPTModel(cfg.model, ParallelState(), seed=7)
    chunk = build_model_chunks(cfg, ParallelState(pp_size=2, pp_rank=1))[1]
    assert torch.equal(chunk.decoder.layers[0].mlp.dense_h_to_4h.weight,
                       full.decoder.layers[6].mlp.dense_h_to_4h.weight)
    assert torch.equal(chunk.word_embeddings_for_head.weight, full.embedding.word_embeddings.weight)


def test_flops_formula():
    cfg = tiny(padded_vocab_size=256)
    b, s, h, L, v = 1, S, 64, 2, 256
    # Narayanan et al. (2021): 72BsLh^2 (1 + s/6h + V/12Lh); 96BsLh^2 (1 + s/6h + V/16Lh) with full recompute.
    # By hand: 72 * 16 * 2 * 64^2 = 9,437,184; 1 + 16/384 + 256/1536 = 29/24; product 11,403,264.
    assert num_floating_point_operations(cfg, 1) == 11403264
    assert 11403264 == pytest.approx(72 * b * s * L * h * h * (1 + s / (6 * h) + v / (12 * L * h)), rel=1e-12)
    recompute = dataclasses.replace(cfg, recompute_granularity="full", recompute_method="uniform",
                                    recompute_num_layers=1)
    assert num_floating_point_operations(recompute, 1) == pytest.approx(
        96 * b * s * L * h * h * (1 + s / (6 * h) + v / (16 * L * h)), rel=1e-12)
    assert num_floating_point_operations(cfg, 5) == 5 * num_floating_point_operations(cfg, 1)
    block = Config(model=tiny(num_layers=8, recompute_granularity="full", recompute_method="block",
                              recompute_num_layers=3),
                   parallel=ParallelConfig(pipeline_model_parallel_size=2))
    assert recomputed_layer_count(block) == 6  # 3 of the 4 layers on each of 2 stages

    # Against torch's own count of the matmul FLOPs the model executes (forward, then backward).
    model = GPTModel(tiny(attention_backend="unfused"), ParallelState())
    ids = tokens(0, b=3)
    with FlopCounterMode(display=False) as fwd:
        loss = model(ids, labels=ids)
    with FlopCounterMode(display=False) as bwd:
        loss.mean().backward()
    assert fwd.get_total_flops() * 3 == num_floating_point_operations(cfg, 3)
    assert fwd.get_total_flops() + bwd.get_total_flops() == num_floating_point_operations(cfg, 3)
