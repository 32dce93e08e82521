"""Pipeline-parallel GPT training equals single-process training (gloo, fp32, dropout 0).

Every layout below trains the same tiny GPT for 5 SGD steps on the same micro-batches; the
loss curve must match the single-process curve within 1e-5 relative, and after the first
step every parameter's gradient (gathered over TP, stage-local layer indices mapped to global
ones) must match the single-process gradient. Layouts: PP=4 and PP=2 (x DP=2) with GPipe,
1F1B and interleaved 1F1B (2 virtual stages), and TP=2 x PP=2 with and without sequence
parallelism. One spawn of 4 ranks runs them all; references run in the test process.
"""
import re

import pytest
import torch
import torch.distributed as dist

from dist_helpers import run_distributed
from megatron_lite.config import Config, ModelConfig, ParallelConfig, TrainConfig

H, HEADS, S, V, MB, M, STEPS, LR, EOD = 32, 4, 16, 128, 2, 4, 5, 0.5, 0

# (name, TP, PP, schedule, num_layers, virtual stages, sequence parallel)
LAYOUTS = [
    ("pp4-gpipe", 1, 4, "gpipe", 4, None, False),
    ("pp4-1f1b", 1, 4, "1f1b", 4, None, False),
    ("pp4-interleaved", 1, 4, "interleaved", 8, 2, False),
    ("pp2dp2-gpipe", 1, 2, "gpipe", 4, None, False),
    ("pp2dp2-1f1b", 1, 2, "1f1b", 4, None, False),
    ("pp2dp2-interleaved", 1, 2, "interleaved", 4, 2, False),
    ("tp2pp2-1f1b", 2, 2, "1f1b", 4, None, False),
    ("tp2pp2-1f1b-sp", 2, 2, "1f1b", 4, None, True),
    ("tp2pp2-interleaved-sp", 2, 2, "interleaved", 4, 2, True),
]


def _config(num_layers, tp=1, pp=1, vp=None, schedule=None, sequence_parallel=False) -> Config:
    model = ModelConfig(num_layers=num_layers, hidden_size=H, num_attention_heads=HEADS, seq_length=S,
                        vocab_size=V, padded_vocab_size=V, hidden_dropout=0.0, attention_dropout=0.0,
                        sequence_parallel=sequence_parallel, eod_mask_loss=True)
    per_chunk = num_layers // (pp * vp) if vp else None
    par = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         num_layers_per_virtual_pipeline_stage=per_chunk, pipeline_schedule=schedule)
    return Config(model=model, parallel=par, train=TrainConfig(micro_batch_size=MB, seed=1234))


def _texts(dp):
    """[step][micro-batch] -> [MB, S+1] token ids; replica r takes micro-batches r*M .. r*M+M-1.
    The same global batch every step, so that the loss visibly falls (random tokens otherwise
    give a flat curve that would hide a schedule that does not train)."""
    g = torch.Generator().manual_seed(7)
    batch = [torch.randint(0, V, (MB, S + 1), generator=g) for _ in range(M * dp)]
    return [batch] * STEPS


def _batches(texts, model_cfg):
    from megatron_lite.training.batch import samples_to_batch
    return [samples_to_batch(t, EOD, model_cfg, torch.device("cpu")) for t in texts]


def _global_name(chunk, name):
    """Stage-local parameter name -> the single-process model's name (the tied head copy is the embedding)."""
    name = re.sub(r"^decoder\.layers\.(\d+)\.",
                  lambda mt: f"decoder.layers.{chunk.layer_offset + int(mt.group(1))}.", name)
    return "embedding.word_embeddings.weight" if name == "word_embeddings_for_head.weight" else name


def _full_grad(p, ps):
    g = p.grad.detach()
    if ps.tp_size > 1 and getattr(p, "tensor_model_parallel", False):
        parts = [torch.empty_like(g) for _ in range(ps.tp_size)]
        dist.all_gather(parts, g.contiguous(), group=ps.tp_group)
        g = torch.cat(parts, dim=p.partition_dim)
    return g.clone()


def _train(chunks, ps, cfg, texts, fb, loss_func_step):
    """5 SGD steps of schedule -> finalize grads -> step; returns (loss curve, step-1 grads)."""
    from megatron_lite.distributed.finalize_grads import finalize_model_grads
    params = [p for c in chunks for p in c.parameters()]
    opt = torch.optim.SGD(params, lr=LR)
    curve, grads = [], {}
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        mine = texts[step][ps.dp_rank * M:(ps.dp_rank + 1) * M]
        batches = _batches(mine, cfg.model)
        iters = [iter(batches) for _ in chunks]
        losses = fb(forward_step_func=loss_func_step, data_iterator=iters if len(chunks) > 1 else iters[0],
                    model=chunks, num_microbatches=M, seq_length=S, micro_batch_size=MB, hidden_size=H,
                    pstate=ps, sequence_parallel=cfg.model.sequence_parallel)
        finalize_model_grads(chunks, ps)
        if ps.is_pipeline_last_stage():
            value = torch.stack([d["lm loss"] for d in losses]).mean().reshape(1)
            dist.all_reduce(value, group=ps.dp_group)
            curve.append(value.item() / ps.dp_size)
        else:
            assert losses == []
        if step == 0:
            for c in chunks:
                for name, p in c.named_parameters():
                    grads.setdefault(_global_name(c, name), []).append(_full_grad(p, ps))
        opt.step()
    return curve, grads


def _parity_worker(rank, world):
    from megatron_lite.model.gpt import build_model_chunks
    from megatron_lite.parallel.random import model_parallel_seed
    from megatron_lite.parallel.schedules import get_forward_backward_func
    from megatron_lite.parallel.state import initialize_parallel
    from megatron_lite.pretrain_gpt import forward_step

    out = {}
    layouts = {}
    for name, tp, pp, schedule, layers, vp, sp in LAYOUTS:
        if (tp, pp) not in layouts:
            layouts[(tp, pp)] = initialize_parallel(tensor=tp, pipeline=pp)
        ps = layouts[(tp, pp)]
        ps.virtual_pp_size = vp
        cfg = _config(layers, tp, pp, vp, schedule, sp)
        model_parallel_seed(cfg.train.seed, ps)
        chunks = build_model_chunks(cfg, ps)
        fb = get_forward_backward_func(cfg)
        curve, grads = _train(chunks, ps, cfg, _texts(ps.dp_size), fb, forward_step)
        out[name] = dict(curve=curve, grads=grads if ps.dp_rank == 0 and ps.tp_rank == 0 else {},
                         fb=fb.__name__)
    return out


def _reference(num_layers, dp):
    """Single process, every micro-batch of the global batch, the same 5 SGD steps."""
    from megatron_lite.model.gpt import GPTModel
    from megatron_lite.parallel.state import ParallelState
    from megatron_lite.pretrain_gpt import forward_step
    cfg = _config(num_layers)
    model = GPTModel(cfg.model, ParallelState(), seed=cfg.train.seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    curve, grads = [], None
    for step, texts in enumerate(_texts(dp)):
        opt.zero_grad(set_to_none=True)
        losses = []
        it = iter(_batches(texts, cfg.model))
        for _ in range(M * dp):
            out, loss_func = forward_step(it, model)
            loss, _ = loss_func(out)
            (loss / (M * dp)).backward()
            losses.append(loss.item())
        curve.append(sum(losses) / len(losses))
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return curve, grads


@pytest.mark.timeout(170)
def test_pipeline_layouts_match_single_process():
    results = run_distributed(_parity_worker, 4, timeout=160)
    refs = {}
    for name, tp, pp, schedule, layers, vp, sp in LAYOUTS:
        dp = 4 // (tp * pp)
        if (layers, dp) not in refs:
            refs[(layers, dp)] = _reference(layers, dp)
        ref_curve, ref_grads = refs[(layers, dp)]
        assert ref_curve[-1] < ref_curve[0] - 0.05  # the reference actually trains
        expected_fb = {"gpipe": "gpipe", "1f1b": "without_interleaving", "interleaved": "with_interleaving"}
        assert expected_fb[schedule] in results[0][name]["fb"]
        # The loss lives on the last stage (ranks (pp-1)*tp*dp ...).
        last_rank = (pp - 1) * tp * dp
        assert results[last_rank][name]["curve"] == pytest.approx(ref_curve, rel=1e-5), name
        seen = set()
        for r in results:
            for pname, copies in r[name]["grads"].items():
                for g in copies:  # the tied head copy must carry the full embedding grad too
                    expected = ref_grads[pname]
                    scale = float(expected.abs().max()) + 1e-30
                    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-5 * scale,
                                               msg=lambda m: f"{name} {pname}: {m}")
                seen.add(pname)
        assert seen == set(ref_grads), (name, set(ref_grads) ^ seen)
    # Interleaving changes the order of work, not the result.
    for a, b in (("pp2dp2-interleaved", "pp2dp2-1f1b"), ("tp2pp2-interleaved-sp", "tp2pp2-1f1b-sp")):
        last = 2  # first rank of the last stage, in PP=2 x DP=2 and in TP=2 x PP=2
        assert results[last][a]["curve"] == pytest.approx(results[last][b]["curve"], rel=1e-6)
