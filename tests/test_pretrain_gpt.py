"""The entry point end to end: preprocess a corpus with the fixture tokenizer, then
``torchrun -m megatron_lite.pretrain_gpt`` at TP=2 on gloo; the loss falls, the metrics file has
every contracted field on every line, validation lines carry ppl = exp(loss), and the checkpoint
lands in Megatron's layout with the tracker file last.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from megatron_lite.parallel.state import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
TRAIN_FIELDS = ("iteration", "consumed_samples", "lm_loss", "lr", "grad_norm", "loss_scale", "skipped_iter",
                "iter_time_s", "tokens_per_s", "tflops_per_device")
ITERS = 40


def _generated_documents(n=120):
    """Fallback corpus when ../shared/data is absent: repetitive but varied English-like text."""
    subjects = ["the king", "a young lord", "my gentle friend", "the old nurse", "our captain"]
    verbs = ["speaks of", "dreams of", "fears", "remembers", "rides toward"]
    objects = ["the northern hills", "a silver crown", "the quiet sea", "his father's house", "the winter court"]
    docs = []
    for d in range(n):
        lines = [f"{subjects[(d + i) % 5].capitalize()} {verbs[(d * 3 + i) % 5]} {objects[(d + 2 * i) % 5]}."
                 for i in range(30)]
        docs.append("\n".join(lines))
    return docs


@pytest.fixture
def data_prefix(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain_data")
    try:
        shared = request.getfixturevalue("shared_data")
        with open(os.path.join(shared, "tinyshakespeare", "input.jsonl"), encoding="utf-8") as f:
            docs = [json.loads(line)["text"] for _, line in zip(range(120), f)]
    except pytest.skip.Exception:
        docs = _generated_documents()
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", str(corpus),
         "--json-keys", "text", "--tokenizer-type", "GPT2BPETokenizer",
         "--vocab-file", os.path.join(TOKENIZER, "vocab.json"), "--merge-file", os.path.join(TOKENIZER, "merges.txt"),
         "--append-eod", "--workers", "1", "--output-prefix", str(tmp / "corpus")],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    prefix = str(tmp / "corpus_text_document")
    assert os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")
    return prefix


@pytest.mark.timeout(180)
def test_torchrun_tp2_trains_and_writes_metrics(data_prefix, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    save = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "megatron_lite.pretrain_gpt",
           "--tensor-model-parallel-size", "2", "--distributed-backend", "gloo",
           "--data-path", data_prefix, "--split", "95,5,0",
           "--vocab-file", os.path.join(TOKENIZER, "vocab.json"), "--merge-file", os.path.join(TOKENIZER, "merges.txt"),
           "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
           "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(ITERS),
           "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "4",
           "--hidden-dropout", "0", "--attention-dropout", "0",
           "--log-interval", "5", "--eval-interval", "20", "--eval-iters", "2",
           "--metrics-jsonl", str(metrics), "--tensorboard-dir", str(tmp_path / "tb"), "--peak-tflops", "1.0",
           "--save", str(save), "--save-interval", "20"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=170, cwd=str(tmp_path), env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr

    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in lines if "split" not in r]
    valid = [r for r in lines if r.get("split") == "valid"]
    assert [r["iteration"] for r in train] == list(range(5, ITERS + 1, 5))
    for r in train:
        for key in TRAIN_FIELDS:
            assert key in r and r[key] is not None, (key, r)
        assert r["consumed_samples"] == 8 * r["iteration"] and r["skipped_iter"] == 0
        assert r["tokens_per_s"] > 0 and r["tflops_per_device"] > 0
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 1.0)
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 0.5, [r["lm_loss"] for r in train]
    assert [r["iteration"] for r in valid] == [20, 40]
    for r in valid:
        assert r["ppl"] == pytest.approx(math.exp(r["lm_loss"]), rel=1e-9)
    assert valid[-1]["lm_loss"] < valid[0]["lm_loss"]

    # The human log: Megatron's line from the logging rank only, and the validation block.
    it_lines = [l for l in out.stdout.splitlines() if l.startswith(" iteration ")]
    assert len(it_lines) == len(train)
    for part in ("consumed samples:", "elapsed time per iteration (ms):", "learning rate:", "global batch size:",
                 "lm loss:", "loss scale:", "grad norm:", "number of skipped iterations:",
                 "number of nan iterations:", "tokens/s:", "TFLOP/s/device:"):
        assert part in it_lines[-1], part
    assert "validation loss at iteration 40" in out.stdout and "lm loss PPL:" in out.stdout
    assert "--peak-tflops 1 TFLOP/s" in out.stdout

    # Checkpoints in Megatron's layout; the tracker names the last one.
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
    for it in (20, 40):
        for tp in (0, 1):
            assert (save / f"iter_{it:07d}" / f"mp_rank_{tp:02d}" / "model_optim_rng.pt").is_file()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))
