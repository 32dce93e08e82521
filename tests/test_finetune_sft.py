"""Instruction fine-tuning: the data tool as a user runs it, what the loss sees, and layouts.

- tools/preprocess_sft.py on Alpaca JSON and chat JSONL: the loss mask is 1 exactly on the response
  (and its end-of-document token); bad records and templates are one line naming file and line;
  on the real instruction data (when ../shared/data is there) the seeded split is 935/110/55 and disjoint;
- prompt tokens get zero loss and zero gradient: changing only the prompt positions' targets leaves
  every gradient bit for bit the same;
- packed examples do not attend to each other: changing one example leaves the other's logits equal;
- the loss is the sum over the response tokens of the global batch over their count: micro-batch
  size 1, 2 or 4 and DP=2 give one curve, and it differs from the mean of micro-batch means;
- TP=2, PP=2 and DP=2 reproduce the single-process SFT loss curve within 1e-5 (fp32);
- tools/generate_sft_responses.py writes the responses beside the references.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dist_helpers import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
TOK_FLAGS = ["--vocab-file", os.path.join(TOKENIZER, "vocab.json"), "--merge-file", os.path.join(TOKENIZER, "merges.txt")]
TEMPLATE = "Q: {instruction}\n\n{input}\n\nA: {response}"
WORDS = "red green blue cat dog sun moon tree river stone bird fish hill road".split()


def tool(name, *args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def records(n=48):
    """Alpaca records with responses of 1 to 9 words: micro-batches hold different token counts."""
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(1 + i % 9)]
        out.append({"instruction": f"Say {len(words)} words", "input": WORDS[i % 5] if i % 3 else "",
                    "output": " ".join(words)})
    return out


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    (tmp / "data.json").write_text(json.dumps(records(), indent=2))
    (tmp / "template.txt").write_text(TEMPLATE)
    r = tool("preprocess_sft.py", "--input", tmp / "data.json", "--output-prefix", tmp / "sft",
             "--prompt-template", tmp / "template.txt", "--split", "70,20,10", *TOK_FLAGS)
    assert r.returncode == 0, r.stderr
    return tmp


def test_preprocess_masks_only_the_response(sft_data, tmp_path):
    from megatron_lite.data.indexed_dataset import IndexedDataset
    from megatron_lite.data.tokenizer import build_tokenizer

    tok = build_tokenizer("GPT2BPETokenizer", *TOK_FLAGS[1::2])
    texts = IndexedDataset(str(sft_data / "sft_train_text_document"))
    masks = IndexedDataset(str(sft_data / "sft_train_loss_mask_document"))
    refs = json.loads((sft_data / "sft_train.json").read_text())
    assert len(texts) == len(masks) == len(refs) > 0
    for ids, mask, ref in zip(texts, masks, refs):
        prompt = tok.tokenize(ref["prompt"])
        assert ref["prompt"].startswith("Q: Say") and ref["prompt"].endswith("A: ")
        assert ("\n\n\n\n" not in ref["prompt"]) and (ref["input"] in ref["prompt"])  # empty input: paragraph dropped
        assert list(mask) == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
        assert tok.detokenize(list(ids[len(prompt):-1])) == ref["output"] and ids[-1] == tok.eod

    # chat JSONL: system and user text are prompt, each assistant reply is trained on
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "hello"},
                                             {"role": "user", "content": "Colour?"},
                                             {"role": "assistant", "content": "blue"}]}) + "\n")
    r = tool("preprocess_sft.py", "--input", chat, "--output-prefix", tmp_path / "chat", "--split", "1,0,0",
             *TOK_FLAGS)
    assert r.returncode == 0, r.stderr
    ids = IndexedDataset(str(tmp_path / "chat_train_text_document"))[0]
    mask = IndexedDataset(str(tmp_path / "chat_train_loss_mask_document"))[0]
    trained = tok.detokenize([int(t) for t, m in zip(ids, mask) if m and t != tok.eod])
    assert trained == "helloblue", trained


@pytest.mark.parametrize("content, template, expect", [
    ('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "input": ""}]', None,
     "data.json:2: record has no 'output' field"),
    ('{"instruction": "a", "output": "b"}\n{"messages": [{"role": "user", "content": "x"}]}\n', None,
     "data.json:2: the conversation has no assistant message"),
    ('{"instruction": "a", "output": "b"}\n', "### Instruction:\n{instruction}\n### Response:\n",
     "template.txt: the template has no {response} marker"),
])
def test_bad_sft_input_is_one_line(tmp_path, content, template, expect):
    (tmp_path / "data.json").write_text(content)
    args = ["--input", tmp_path / "data.json", "--output-prefix", tmp_path / "out", *TOK_FLAGS]
    if template is not None:
        (tmp_path / "template.txt").write_text(template)
        args += ["--prompt-template", tmp_path / "template.txt"]
    r = tool("preprocess_sft.py", *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not list(tmp_path.glob("out*"))


def test_real_instruction_data_split(shared_data, tmp_path):
    data = os.path.join(shared_data, "instructions", "instruction-data.json")
    r = tool("preprocess_sft.py", "--input", data, "--output-prefix", tmp_path / "sft", "--seed", "1234", *TOK_FLAGS)
    assert r.returncode == 0, r.stderr
    splits = {s: json.loads((tmp_path / f"sft_{s}.json").read_text()) for s in ("train", "valid", "test")}
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [935, 110, 55]
    lines = [{r["source_line"] for r in splits[s]} for s in splits]
    assert not (lines[0] & lines[1] or lines[0] & lines[2] or lines[1] & lines[2])


# ---- the loss ---------------------------------------------------------------------------------
def _tiny_model(seq, vocab=2048):
    from megatron_lite.config import ModelConfig
    from megatron_lite.model.gpt import GPTModel
    from megatron_lite.parallel.state import ParallelState

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=seq, vocab_size=vocab,
                      padded_vocab_size=vocab, hidden_dropout=0.0, attention_dropout=0.0,
                      reset_attention_mask=True, reset_position_ids=True)
    return GPTModel(cfg, ParallelState()), cfg


def _eod():
    from megatron_lite.data.tokenizer import build_tokenizer
    return build_tokenizer("GPT2BPETokenizer", *TOK_FLAGS[1::2]).eod


def _stack(samples, eod, model_cfg):
    from megatron_lite.training.batch import samples_to_batch

    return samples_to_batch(torch.from_numpy(np.stack([s["text"] for s in samples])), eod, model_cfg, "cpu",
                            torch.from_numpy(np.stack([s["loss_mask"] for s in samples])))


def _batch(sft_data, seq, pack=True, n=4):
    from megatron_lite.data.sft_dataset import SFTDataset

    ds = SFTDataset(str(sft_data / "sft_train"), seq, _eod(), pack=pack)
    model, cfg = _tiny_model(seq)
    return ds, model, _stack([ds[i] for i in range(n)], _eod(), cfg)


def test_prompt_tokens_get_zero_loss_and_zero_gradient(sft_data):
    from megatron_lite.pretrain_gpt import loss_func

    ds, model, b = _batch(sft_data, 64)
    assert 0 < b["loss_mask"].sum() < b["loss_mask"].numel()

    def grads(labels):
        model.zero_grad(set_to_none=True)
        loss, report = loss_func(b["loss_mask"], model(b["tokens"], b["position_ids"], b["attention_mask"],
                                                       labels=labels), per_token_loss=True)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, ref = grads(b["labels"])
    perturbed = b["labels"].clone()
    prompt = b["loss_mask"] == 0
    perturbed[prompt] = torch.randint(1, 2000, (int(prompt.sum()),), generator=torch.Generator().manual_seed(3))
    assert not torch.equal(perturbed, b["labels"])
    loss2, got = grads(perturbed)
    assert torch.equal(loss, loss2)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_packed_examples_do_not_attend_to_each_other(sft_data):
    seq = 64
    ds, model, b = _batch(sft_data, seq, n=1)
    first = ds.samples[0]
    assert len(first) >= 2, "the fixture must pack two examples into one sample"
    len0 = min(len(ds.texts[first[0]]), seq)
    assert int(b["position_ids"][0, len0]) == 0  # positions restart at the second example
    logits = model(b["tokens"], b["position_ids"], b["attention_mask"])
    changed = b["tokens"].clone()
    changed[0, :len0 - 1] = torch.randint(1, 2000, (len0 - 1,), generator=torch.Generator().manual_seed(5))
    logits2 = model(changed, b["position_ids"], b["attention_mask"])
    assert not torch.allclose(logits[0, :len0 - 1], logits2[0, :len0 - 1])  # the changed example did change
    torch.testing.assert_close(logits2[0, len0:], logits[0, len0:], rtol=0, atol=1e-6)


# ---- training at every layout -----------------------------------------------------------------
def _flags(sft_data, extra=()):
    return ["--train-data", str(sft_data / "sft_train"), "--valid-data", str(sft_data / "sft_valid"),
            *TOK_FLAGS, "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "48", "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "4",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "3e-3", "--lr-warmup-iters", "0",
            "--log-interval", "100", "--eval-interval", "4", "--eval-iters", "1", "--seed", "11",
            "--distributed-backend", "gloo", *extra]


def _run_variants(rank, world, variants):
    from megatron_lite.finetune_gpt import finetune_gpt, parse_args
    from megatron_lite.parallel.state import get_parallel_state

    out = {}
    for name, argv in variants.items():
        cfg, ft = parse_args(argv)
        summary = finetune_gpt(cfg, ft, world_size=world)
        if get_parallel_state().is_logging_rank:
            out[name] = {"losses": summary.losses, "grad_norms": summary.grad_norms,
                         "valid": [v["lm_loss"] for v in summary.valid]}
    return out


def _global_batch_losses(sft_data, micro):
    """First iteration's loss at the initial weights from one forward of its 8 samples: the global
    per-token mean, and the mean of per-micro-batch means (what the trainer must not report)."""
    from megatron_lite.config import pad_vocab_size
    from megatron_lite.data.sft_dataset import SFTDataset
    from megatron_lite.finetune_gpt import model_provider, parse_args, prepare
    from megatron_lite.parallel.state import ParallelState

    cfg, ft = parse_args(_flags(sft_data))
    prepare(cfg, ft)
    cfg.model.vocab_size = 2048
    cfg.model.padded_vocab_size = pad_vocab_size(2048, cfg.model.make_vocab_size_divisible_by, 1)
    model = model_provider(ft, cfg, ParallelState())[0]
    ds = SFTDataset(str(sft_data / "sft_train"), 48, _eod(), num_samples=8, shuffle=True, seed=cfg.train.seed)
    b = _stack([ds[i] for i in range(8)], _eod(), cfg.model)
    with torch.no_grad():
        per_token = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"]) * b["loss_mask"]
    mask = b["loss_mask"]
    means = [float(per_token[i:i + micro].sum() / mask[i:i + micro].sum()) for i in range(0, 8, micro)]
    return float(per_token.sum() / mask.sum()), sum(means) / len(means)


@pytest.mark.timeout(240)
def test_sft_loss_is_layout_and_micro_batch_independent(sft_data):
    single = {"mbs4": _flags(sft_data), "mbs1": _flags(sft_data, ["--micro-batch-size", "1"]),
              "mbs2": _flags(sft_data, ["--micro-batch-size", "2"]),
              "no_pack": _flags(sft_data, ["--no-pack"])}
    two = {"tp2": _flags(sft_data, ["--tensor-model-parallel-size", "2"]),
           "tp2_sp": _flags(sft_data, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
           "pp2": _flags(sft_data, ["--pipeline-model-parallel-size", "2"]),
           "dp2": _flags(sft_data),
           "dp2_mbs1": _flags(sft_data, ["--micro-batch-size", "1"])}
    ref = run_distributed(_run_variants, 1, args=(single,), timeout=120)[0]
    curves = {}
    for r in run_distributed(_run_variants, 2, args=(two,), timeout=180):
        curves.update(r)
    base = ref["mbs4"]
    assert len(base["losses"]) == 4 and base["losses"][-1] < base["losses"][0]
    for name, got in list(curves.items()) + [("mbs1", ref["mbs1"]), ("mbs2", ref["mbs2"])]:
        assert got["losses"] == pytest.approx(base["losses"], rel=1e-5), name
        assert got["grad_norms"] == pytest.approx(base["grad_norms"], rel=1e-5), name
        assert got["valid"] == pytest.approx(base["valid"], rel=1e-5), name
    assert ref["no_pack"]["losses"] != pytest.approx(base["losses"], rel=1e-3)  # other samples, other curve

    token_mean, mean_of_means = _global_batch_losses(sft_data, micro=1)
    assert base["losses"][0] == pytest.approx(token_mean, rel=1e-5)
    # the fixture does tell the two apart: per-sample means differ from the token mean by far more than 1e-5
    assert abs(mean_of_means - token_mean) > 1e-4 * token_mean, (mean_of_means, token_mean)


@pytest.mark.timeout(120)
def test_finetune_entry_point_then_responses_beside_references(sft_data, tmp_path):
    """As a user runs them: the fine-tuning entry point saves a checkpoint, the response tool reads
    the test split's prompts from it and writes responses next to the references."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "megatron_lite.finetune_gpt", "--task", "sft",
                        *_flags(sft_data, ["--train-iters", "3", "--save", str(tmp_path / "ckpt")])],
                       capture_output=True, text=True, timeout=100, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "validation loss at iteration 3" in r.stdout
    out = tmp_path / "responses.json"
    r = tool("generate_sft_responses.py", "--load", tmp_path / "ckpt", "--input", sft_data / "sft_test.json",
             "--output", out, "--max-new-tokens", "4", "--limit", "3", "--show", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    refs = json.loads((sft_data / "sft_test.json").read_text())[:3]
    assert [x["reference"] for x in rows] == [x["output"] for x in refs]
    assert all(isinstance(x["response"], str) for x in rows) and "--- instruction:" in r.stdout


@pytest.mark.parametrize("script", ["finetune_instructions.sh", "finetune_classification.sh"])
def test_example_without_its_inputs_says_so(script, tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", script), str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, LOAD=str(tmp_path / "none")))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "not found" in lines[0]
