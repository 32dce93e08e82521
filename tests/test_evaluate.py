"""tools/evaluate.py: WikiText perplexity (sliding window, token- and word-level) and LAMBADA
last-word accuracy, checked against an independent computation with HuggingFace's GPT2LMHeadModel
on the same checkpoint exported by tools/checkpoint_convert.py, and TP=2 against TP=1.

The checkpoint is a TP=2 model with --lr 0 (its weights are the layout-independent initial ones,
drawn wide enough, --init-method-std 0.2, that greedy choices are confident), so a TP=1 run of the
same flags saves the same weights.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SHARED_DATA
from dist_helpers import free_port, run_entry_point

TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
SEQ = 64
TRAIN = ["--mock-data", "--vocab-file", os.path.join(TOKENIZER, "vocab.json"),
         "--merge-file", os.path.join(TOKENIZER, "merges.txt"), "--make-vocab-size-divisible-by", "64",
         "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", str(SEQ),
         "--max-position-embeddings", str(SEQ), "--openai-gelu", "--micro-batch-size", "1",
         "--global-batch-size", "2", "--train-iters", "1", "--lr", "0", "--min-lr", "0", "--hidden-dropout", "0",
         "--attention-dropout", "0", "--eval-iters", "0", "--seed", "7", "--init-method-std", "0.2",
         "--distributed-backend", "gloo"]
FALLBACK_WIKI = (" = Valkyria Chronicles = \n \n The game 's battle system , the BliTZ system , is carried over "
                 "from the first game . During missions , players select each unit using a top @-@ down "
                 "perspective of the battlefield map : once a character is selected , the player moves the "
                 "character around the battlefield in third @-@ person . \n") * 6
FALLBACK_LAMBADA = ["She opened the door and saw the garden, green and quiet. She loved the garden",
                    "He took the key from the table and put the key in his pocket. Then he lost the key",
                    "The dog barked at the cat, and the cat ran up the tree to escape the dog"] * 4


def _inputs(tmp_path):
    wiki, lambada = tmp_path / "wiki.txt", tmp_path / "lambada.jsonl"
    if os.path.isdir(SHARED_DATA):
        with open(os.path.join(SHARED_DATA, "wikitext-2", "test.txt"), encoding="utf-8") as f:
            wiki.write_text(f.read(2500), encoding="utf-8")
        with open(os.path.join(SHARED_DATA, "lambada", "lambada_test.jsonl"), encoding="utf-8") as f:
            lambada.write_text("".join(f.readline() for _ in range(16)), encoding="utf-8")
    else:
        wiki.write_text(FALLBACK_WIKI, encoding="utf-8")
        lambada.write_text("".join(json.dumps({"text": t}) + "\n" for t in FALLBACK_LAMBADA), encoding="utf-8")
    return str(wiki), str(lambada)


def _evaluate(load, nproc, *args, timeout=180):
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    cmd += [os.path.join(ROOT, "tools", "evaluate.py"), "--load", load, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def _hf_wikitext(hf, ids, stride):
    """Sliding-window loss written out plainly: window i covers ids[i*stride : i*stride + SEQ + 1] and,
    after the first, scores only targets SEQ - stride .. SEQ - 1 (those the previous window did not)."""
    total, i = 0.0, 0
    while True:
        window = ids[i * stride: i * stride + SEQ + 1]
        with torch.no_grad():
            logits = hf(torch.tensor([window[:-1]])).logits[0].double()
        losses = torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="none")
        total += float(losses.sum() if i == 0 else losses[SEQ - stride:].sum())
        if i * stride + SEQ + 1 >= len(ids):
            return total / (len(ids) - 1)
        i += 1


def _hf_lambada(hf, tok, texts):
    correct, logprob, n = [], 0.0, 0
    for text in texts:
        ids = tok.tokenize(text)
        ctx, target = ids[:-1], ids[-1:]
        seq = (ctx + target)[-(SEQ + 1):]
        with torch.no_grad():
            logits = hf(torch.tensor([seq[:-1]])).logits[0, -len(target):].double()
        correct.append(bool((logits.argmax(-1) == torch.tensor(target)).all()))
        logprob += float(torch.log_softmax(logits, -1)[range(len(target)), target].sum())
        n += len(target)
    return correct, math.exp(-logprob / n)


@pytest.mark.timeout(400)
def test_metrics_equal_huggingface_and_tp2_equals_tp1(tmp_path):
    transformers = pytest.importorskip("transformers")
    from megatron_lite.data.tokenizer import build_tokenizer
    from megatron_lite.inference.evaluation import wikitext_detokenize

    wiki, lambada = _inputs(tmp_path)
    for name, nproc in (("tp2", 2), ("tp1", 1)):
        layout = ["--tensor-model-parallel-size", str(nproc)]
        r = run_entry_point(TRAIN + layout + ["--save", str(tmp_path / name)], tmp_path,
                            nproc=nproc if nproc > 1 else None, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
    results = {}
    for name, nproc in (("tp2", 2), ("tp1", 1)):
        out = tmp_path / f"{name}.json"
        proc = _evaluate(str(tmp_path / name), nproc, "--wikitext", wiki, "--overlapping-eval", "16",
                         "--lambada", lambada, "--micro-batch-size", "3", "--json-out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = [line for line in proc.stdout.splitlines() if line.startswith("evaluate:")]
        assert len(summary) == 1 and "WikiText PPL" in summary[0] and "LAMBADA accuracy" in summary[0]
        results[name] = json.loads(out.read_text())
    tp1, tp2 = results["tp1"], results["tp2"]
    for key in ("loss", "ppl", "adjusted_ppl"):
        assert tp2["wikitext"][key] == pytest.approx(tp1["wikitext"][key], rel=1e-5)
    assert tp2["lambada"]["correct"] == tp1["lambada"]["correct"]
    assert tp2["lambada"]["last_word_ppl"] == pytest.approx(tp1["lambada"]["last_word_ppl"], rel=1e-5)

    hf_dir = str(tmp_path / "hf")
    proc = subprocess.run([sys.executable, "tools/checkpoint_convert.py", "--load-dir", str(tmp_path / "tp2"),
                           "--target", "huggingface", "--save-dir", hf_dir], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    tok = build_tokenizer("GPT2BPETokenizer", os.path.join(TOKENIZER, "vocab.json"),
                          os.path.join(TOKENIZER, "merges.txt"))
    raw = open(wiki, encoding="utf-8").read()
    ids = tok.tokenize(wikitext_detokenize(raw))
    assert len(ids) > 3 * SEQ  # several windows
    loss = _hf_wikitext(hf, ids, 16)
    words = len(raw.strip().split(" "))
    assert tp2["wikitext"]["loss"] == pytest.approx(loss, rel=1e-4)
    assert tp2["wikitext"]["adjusted_ppl"] == pytest.approx(
        math.exp(min(20, loss * (len(ids) - 1) / (words - 1))), rel=1e-4)
    texts = [json.loads(line)["text"] for line in open(lambada, encoding="utf-8")]
    correct, ppl = _hf_lambada(hf, tok, texts)
    assert tp2["lambada"]["correct"] == correct
    assert tp2["lambada"]["accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert tp2["lambada"]["last_word_ppl"] == pytest.approx(ppl, rel=1e-4)
    assert tp2["lambada"]["accuracy_stop_word_filter"] >= 0.0

    # The example script: the same run at the checkpoint's own layout, as a table.
    env = dict(os.environ, LOAD=str(tmp_path / "tp2"), WIKITEXT=wiki, LAMBADA=lambada, OVERLAPPING_EVAL="16",
               PYTHON=sys.executable, OUT=str(tmp_path / "example.json"), MASTER_PORT=str(free_port()))
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "evaluate_gpt.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "token PPL" in proc.stdout and f"LAMBADA ({len(texts)} passages)" in proc.stdout, proc.stdout
    example = json.loads((tmp_path / "example.json").read_text())
    assert example["wikitext"]["loss"] == pytest.approx(tp2["wikitext"]["loss"], rel=1e-6)

    # Bad input: one line each, before the model is loaded.
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "a fine passage here"}\n{"txt": 1}\n')
    cases = [(["--wikitext", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
             (["--wikitext", str(empty)], "empty"),
             (["--wikitext", wiki], "--overlapping-eval"),
             (["--lambada", str(bad_jsonl)], "bad.jsonl:2"),
             ([], "nothing to evaluate")]
    for args, says in cases:
        proc = _evaluate(str(tmp_path / "tp1"), 1, *args)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and says in errors[0], (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
