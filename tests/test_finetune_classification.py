"""Text classification: the data tools as a user runs them, learning, layouts, freezing.

- tools/make_author_task.py on the Gutenberg books (when ../shared/data is there): balanced,
  deterministic, and no paragraph in two splits; tools/preprocess_classification.py maps string
  labels to ids; a label never seen in training and an empty text are one line naming file and line;
- on a synthetic separable task, ``python -m megatron_lite.finetune_gpt --task classification``
  from scratch reaches > 95% test accuracy and writes accuracy, per-class precision/recall and the
  confusion matrix to --results-json;
- TP=2 (also with sequence parallelism) and PP=2 equal TP=1 within 1e-5 on the loss curve and give
  the same predictions; a pretrained LM checkpoint loads under --finetune with the head swapped, and
  --train-last-layers 3 of 4 leaves the embedding and the first layer bit for bit unchanged (PP=2 runs
  the same curve, its first stage's tied embedding frozen on both stages).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from dist_helpers import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
TOK_FLAGS = ["--vocab-file", os.path.join(TOKENIZER, "vocab.json"), "--merge-file", os.path.join(TOKENIZER, "merges.txt")]
# Three classes told apart by their vocabulary: separable, but only from what the words are.
CLASS_WORDS = {"weather": "rain snow wind storm cloud sun fog frost".split(),
               "food": "bread apple cheese soup rice honey milk pear".split(),
               "animals": "horse tiger mouse eagle whale sheep goat wolf".split()}


def tool(name, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


def synthetic(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    names = sorted(CLASS_WORDS)
    for i in range(n):
        label = names[i % 3]
        words = CLASS_WORDS[label]
        k = int(torch.randint(3, 9, (1,), generator=g))
        text = " ".join(words[int(j)] for j in torch.randint(0, len(words), (k,), generator=g))
        out.append({"text": text, "label": label})
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cls")
    for split, n, seed in (("train", 240, 1), ("valid", 30, 2), ("test", 60, 3)):
        write_jsonl(tmp / f"{split}.jsonl", synthetic(n, seed))
    r = tool("preprocess_classification.py", "--train", tmp / "train.jsonl", "--valid", tmp / "valid.jsonl",
             "--test", tmp / "test.jsonl", "--output-prefix", tmp / "syn", *TOK_FLAGS)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp / "syn_labels.json").read_text())["labels"] == ["animals", "food", "weather"]
    return tmp


def test_author_task_is_balanced_and_disjoint(shared_data, tmp_path):
    src = os.path.join(shared_data, "gutenberg")
    r = tool("make_author_task.py", "--input-dir", src, "--output-dir", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    r2 = tool("make_author_task.py", "--input-dir", src, "--output-dir", tmp_path / "b")
    rows = {}
    for split in ("train", "valid", "test"):
        text = (tmp_path / "a" / f"{split}.jsonl").read_text()
        assert text == (tmp_path / "b" / f"{split}.jsonl").read_text()  # deterministic
        rows[split] = [json.loads(line) for line in text.splitlines()]
        counts = {}
        for row in rows[split]:
            counts[row["label"]] = counts.get(row["label"], 0) + 1
        assert len(counts) >= 5 and len(set(counts.values())) == 1, counts  # balanced
    sources = [{row["source"] for row in rows[s]} for s in rows]
    texts = [{row["text"] for row in rows[s]} for s in rows]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not sources[a] & sources[b] and not texts[a] & texts[b]
    assert r2.returncode == 0 and "authors: austen" in r.stdout


@pytest.mark.parametrize("valid_rows, expect", [
    ([{"text": "rain snow", "label": "weather"}, {"text": "x", "label": "plants"}],
     "valid.jsonl:2: label 'plants' never appears in --train"),
    ([{"text": "rain", "label": "weather"}, {"text": "bread", "label": "food"}, {"text": "  ", "label": "food"}],
     "valid.jsonl:3: the text is empty"),
])
def test_bad_classification_input_is_one_line(tmp_path, valid_rows, expect):
    write_jsonl(tmp_path / "train.jsonl", synthetic(12, 0))
    write_jsonl(tmp_path / "valid.jsonl", valid_rows)
    r = tool("preprocess_classification.py", "--train", tmp_path / "train.jsonl", "--valid", tmp_path / "valid.jsonl",
             "--output-prefix", tmp_path / "out", *TOK_FLAGS)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert not list(tmp_path.glob("out*"))


def _flags(d, extra=()):
    return ["--task", "classification", "--train-data", str(d / "syn_train"), "--valid-data", str(d / "syn_valid"),
            "--test-data", str(d / "syn_test"), *TOK_FLAGS, "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "4",
            "--global-batch-size", "8", "--hidden-dropout", "0", "--attention-dropout", "0", "--lr", "2e-3",
            "--lr-warmup-iters", "0", "--log-interval", "100", "--eval-interval", "100", "--eval-iters", "1",
            "--seed", "5", "--distributed-backend", "gloo", *extra]


@pytest.mark.timeout(120)
def test_separable_task_reaches_95_percent(cls_data, tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "megatron_lite.finetune_gpt", *_flags(cls_data, [
        "--train-iters", "60", "--global-batch-size", "16", "--lr-decay-style", "cosine", "--results-json", str(out)])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=110, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    test = res["splits"]["test"]
    assert test["examples"] == 60 and test["accuracy"] > 0.95, test
    assert set(test["per_class"]) == {"animals", "food", "weather"}
    assert all(0.0 <= v["precision"] <= 1.0 and 0.0 <= v["recall"] <= 1.0 for v in test["per_class"].values())
    assert sum(map(sum, test["confusion_matrix"])) == 60 and len(test["predictions"]) == 60
    assert test["majority_baseline_accuracy"] == pytest.approx(1 / 3)
    assert "> test: accuracy" in r.stdout


def _run_variants(rank, world, variants, pretrain_argv):
    from megatron_lite.config import parse_args as parse_pretrain
    from megatron_lite.finetune_gpt import finetune_gpt, parse_args
    from megatron_lite.parallel.state import get_parallel_state
    from megatron_lite.pretrain_gpt import pretrain_gpt

    if pretrain_argv:
        pretrain_gpt(parse_pretrain(pretrain_argv), world_size=world)
    out = {}
    for name, argv in variants.items():
        cfg, ft = parse_args(argv)
        summary = finetune_gpt(cfg, ft, world_size=world)
        if get_parallel_state().is_logging_rank:
            res = summary.classification["splits"]
            out[name] = {"losses": summary.losses, "grad_norms": summary.grad_norms,
                         "predictions": {s: res[s]["predictions"] for s in res}}
    return out


def _shard(save, iteration):
    return torch.load(os.path.join(save, f"iter_{iteration:07d}", "mp_rank_00", "model_optim_rng.pt"),
                      weights_only=True)["model"]


@pytest.mark.timeout(240)
def test_layouts_match_and_frozen_layers_stay(cls_data, tmp_path):
    lm = str(tmp_path / "lm")
    pretrain_argv = ["--mock-data", *TOK_FLAGS, "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads",
                     "4", "--seq-length", "16", "--micro-batch-size", "4", "--global-batch-size", "4",
                     "--train-iters", "2", "--lr", "1e-3", "--eval-iters", "0", "--log-interval", "100",
                     "--hidden-dropout", "0", "--attention-dropout", "0", "--save", lm, "--distributed-backend", "gloo"]
    frozen = ["--num-layers", "4", "--finetune", "--load", lm, "--train-last-layers", "3"]
    iters = ["--train-iters", "4"]
    single = {"tp1": _flags(cls_data, iters),
              "frozen": _flags(cls_data, iters + frozen + ["--save", str(tmp_path / "ft")])}
    two = {"tp2": _flags(cls_data, iters + ["--tensor-model-parallel-size", "2"]),
           "tp2_sp": _flags(cls_data, iters + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
           "pp2": _flags(cls_data, iters + ["--pipeline-model-parallel-size", "2"]),
           "pp2_frozen": _flags(cls_data, iters + ["--pipeline-model-parallel-size", "2", "--num-layers", "4",
                                                   "--finetune", "--load", str(tmp_path / "lm_pp2"),
                                                   "--train-last-layers", "3"])}
    ref = run_distributed(_run_variants, 1, args=(single, pretrain_argv), timeout=120)[0]
    lm_pp2 = [a if a != lm else str(tmp_path / "lm_pp2") for a in pretrain_argv] + ["--pipeline-model-parallel-size", "2"]
    curves = {}
    for r in run_distributed(_run_variants, 2, args=(two, lm_pp2), timeout=180):
        curves.update(r)
    for name in ("tp2", "tp2_sp", "pp2"):
        assert curves[name]["losses"] == pytest.approx(ref["tp1"]["losses"], rel=1e-5), name
        assert curves[name]["grad_norms"] == pytest.approx(ref["tp1"]["grad_norms"], rel=1e-5), name
        assert curves[name]["predictions"] == ref["tp1"]["predictions"], name
    # The same pretrained weights (layout-independent init) and freezing at PP=2: the same run.
    assert curves["pp2_frozen"]["losses"] == pytest.approx(ref["frozen"]["losses"], rel=1e-5)

    before, after = _shard(lm, 2), _shard(str(tmp_path / "ft"), 4)
    assert "output_layer.classifier.weight" in after and "output_layer.classifier.weight" not in before
    for name, value in before.items():
        if name.startswith(("embedding.", "decoder.layers.0.")):
            assert torch.equal(after[name], value), name  # frozen: bit for bit
        elif name.startswith("decoder.layers.3.") and name.endswith("weight"):
            assert not torch.equal(after[name], value), name  # trained
