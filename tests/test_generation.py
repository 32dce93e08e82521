"""KV-cache generation (megatron_lite.inference): cached decoding equals recomputing the prefix,
token for token and log-prob for log-prob, for a batch of prompts of different lengths, and every
layout (TP=2, PP=2, TP2 x PP2, interleaved PP2) gives the TP=1 tokens, greedy and seeded sampling
alike, with learned positions and with RoPE.

One 4-rank spawn runs every layout: with fewer model-parallel ranks than processes the extra ranks
are data-parallel replicas doing the same work.
"""
import pytest
import torch

from dist_helpers import run_distributed

BASE = ["--vocab-size", "250", "--make-vocab-size-divisible-by", "64", "--num-layers", "4", "--hidden-size", "64",
        "--num-attention-heads", "4", "--seq-length", "48", "--max-position-embeddings", "48",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--init-method-std", "0.3", "--seed", "11",
        "--micro-batch-size", "1", "--mock-data"]
LAYOUTS = {"tp1": (1, 1, None), "tp2": (2, 1, None), "pp2": (1, 2, None), "tp2pp2": (2, 2, None),
           "pp2_interleaved": (1, 2, 1)}
PROMPTS = [[5, 17, 33], [9, 2, 200, 41, 7, 7, 13], [101], [3, 3, 3, 3, 60]]
EOD = 249


def _build(flags, tp, pp, vp):
    from megatron_lite.config import parse_args, pad_vocab_size
    from megatron_lite.inference.loading import InferenceModel
    from megatron_lite.model.gpt import build_model_chunks
    from megatron_lite.parallel.random import model_parallel_seed
    from megatron_lite.parallel.state import initialize_parallel

    layout = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    if vp:
        layout += ["--num-layers-per-virtual-pipeline-stage", str(vp)]
    cfg = parse_args(BASE + flags + layout)
    ps = initialize_parallel(tp, pp, None, backend="gloo", virtual_pipeline=cfg.virtual_pipeline_size())
    m = cfg.model
    m.padded_vocab_size = pad_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
    model_parallel_seed(cfg.train.seed, ps)
    chunks = [c.eval() for c in build_model_chunks(cfg, ps)]
    return InferenceModel(chunks, cfg, ps, 0)


def _every_layout(rank, world):
    from megatron_lite.inference.generation import generate
    from megatron_lite.inference.sampling import SamplingParams

    out = {}
    for pos in ("learned_absolute", "rope"):
        for name, (tp, pp, vp) in LAYOUTS.items():
            model = _build(["--position-embedding-type", pos], tp, pp, vp)
            runs = {}
            for cached in (True, False):
                g = generate(model, PROMPTS, 12, eod=EOD, use_cache=cached)
                runs[f"greedy_{cached}"] = [(r.tokens, r.logprobs) for r in g]
            s = generate(model, PROMPTS, 12, SamplingParams(temperature=0.9, top_p=0.95, seed=7), eod=EOD)
            runs["sampled"] = [r.tokens for r in s]
            out[(pos, name)] = runs
            if name != "tp1":  # the rest is about sampling and stopping, not layouts
                continue
            again = generate(model, PROMPTS, 12, SamplingParams(temperature=0.9, top_p=0.95, seed=7), eod=EOD)
            runs["sampled_again"] = [r.tokens for r in again]
            runs["top_k1"] = [r.tokens for r in generate(model, PROMPTS, 12, SamplingParams(top_k=1, seed=3),
                                                         eod=EOD)]
            plain = [r.generated for r in generate(model, PROMPTS, 12)]  # no end-of-text token at all
            first = plain[0][0]  # make row 0's first new token the end of text: it stops there
            runs["stop"] = [(r.generated, r.stopped_at_eod) for r in generate(model, PROMPTS, 12, eod=first)]
            runs["stop_token"], runs["plain"] = first, plain
    return out


@pytest.mark.timeout(300)
def test_cache_equals_recompute_and_every_layout_equals_tp1():
    results = run_distributed(_every_layout, 4, timeout=280)
    for rank_out in results[1:]:  # every rank returns the same thing
        assert rank_out.keys() == results[0].keys()
    res = results[0]
    for pos in ("learned_absolute", "rope"):
        ref = res[(pos, "tp1")]
        cached, uncached = ref["greedy_True"], ref["greedy_False"]
        for (tok_c, lp_c), (tok_u, lp_u), prompt in zip(cached, uncached, PROMPTS):
            assert tok_c[:len(prompt)] == prompt
            assert tok_c == tok_u
            assert torch.allclose(torch.tensor(lp_c), torch.tensor(lp_u), atol=1e-5, rtol=0)
        assert any(len(t) > len(p) + 3 for (t, _), p in zip(cached, PROMPTS))  # something was generated
        assert ref["sampled"] == ref["sampled_again"]
        assert ref["sampled"] != [t for t, _ in cached]  # sampling is not greedy
        assert ref["top_k1"] == [t for t, _ in cached]
        first = ref["stop_token"]
        assert ref["stop"][0] == ([first], True)
        for (gen, stopped), full in zip(ref["stop"], ref["plain"]):
            assert len(full) == 12
            if first in full:  # every row stops at its first end-of-text token, which it keeps
                assert stopped and gen == full[:full.index(first) + 1]
            else:
                assert not stopped and gen == full
        for name in LAYOUTS:
            got = res[(pos, name)]
            for key in ("greedy_True", "greedy_False"):
                assert [t for t, _ in got[key]] == [t for t, _ in ref[key]], (pos, name, key)
                for (_, lp), (_, lp_ref) in zip(got[key], ref[key]):
                    assert torch.allclose(torch.tensor(lp), torch.tensor(lp_ref), atol=1e-5, rtol=0), (pos, name)
            assert got["sampled"] == ref["sampled"], (pos, name)


def test_top_p_keeps_exactly_the_nucleus_and_top_k_the_k_largest():
    from megatron_lite.inference.sampling import SamplingParams, sample, top_k_filter, top_p_filter

    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log()
    # Sorted: 0.4, 0.3, 0.15, 0.1, 0.05. Cumulative 0.4, 0.7, 0.85: p=0.7 keeps {1, 3}; p=0.71 adds 4.
    kept = lambda x: torch.isfinite(x[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(top_p_filter(logits, 0.7)) == [1, 3]
    assert kept(top_p_filter(logits, 0.71)) == [1, 3, 4]
    assert kept(top_p_filter(logits, 0.3)) == [1]
    assert kept(top_k_filter(logits, 2)) == [1, 3]
    g = torch.Generator().manual_seed(0)
    draws = [int(sample(logits, SamplingParams(top_p=0.7, seed=0), g)) for _ in range(200)]
    assert set(draws) == {1, 3}
    share = draws.count(1) / len(draws)
    assert 0.45 < share < 0.7  # renormalised 0.4 / 0.7 = 0.57
    assert int(sample(logits, SamplingParams(top_k=1), None)) == 1
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
