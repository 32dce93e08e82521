"""tools/checkpoint_convert.py: resharding between layouts and HuggingFace GPT-2, proven by equal
tensors, equal validation losses and equal logits.

One TP2 x PP2 run (4 layers, dropout off, vocabulary 250 padded to 256) trains 3 of 6 iterations and
saves with its optimizer state; the continuous 6-iteration run is the reference curve.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from dist_helpers import run_distributed

BASE = ["--mock-data", "--vocab-size", "250", "--make-vocab-size-divisible-by", "16",
        "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "1", "--global-batch-size", "4", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--lr", "3e-3", "--lr-decay-iters", "6", "--lr-decay-style", "cosine", "--log-interval", "100",
        "--eval-interval", "100", "--eval-iters", "2", "--seed", "5", "--distributed-backend", "gloo",
        "--split", "98,1,1"]
TP2PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]


def layout(tp, pp, vp_layers=None):
    flags = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    return flags + (["--num-layers-per-virtual-pipeline-stage", str(vp_layers)] if vp_layers else [])


def _train(rank, world, runs):
    from megatron_lite.config import parse_args
    from megatron_lite.parallel.state import get_parallel_state
    from megatron_lite.pretrain_gpt import pretrain_gpt

    out = {}
    for name, extra in runs.items():
        s = pretrain_gpt(parse_args(BASE + extra), world_size=world)
        if get_parallel_state().is_logging_rank:
            out[name] = {"losses": s.losses, "valid": [v["lm_loss"] for v in s.valid if v["split"] == "valid"]}
    return out


def _merged(world, runs, timeout=240):
    out = {}
    for r in run_distributed(_train, world, args=(runs,), timeout=timeout):
        out.update(r)
    return out


def convert(*args):
    proc = subprocess.run([sys.executable, "tools/checkpoint_convert.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    return proc


def _equal(a, b, path=""):
    """Paths where two nested checkpoint structures differ (tensors compared bit for bit)."""
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _equal(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _equal(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [path]
    return [] if a == b else [path]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    src = str(root / "tp2pp2")
    runs = _merged(4, {"full": TP2PP2 + ["--train-iters", "6"],
                       "first": TP2PP2 + ["--train-iters", "6", "--exit-interval", "3", "--save", src],
                       "valid": TP2PP2 + ["--train-iters", "3", "--load", src]})
    return root, src, runs


@pytest.mark.timeout(600)
def test_round_trip_is_bitwise_and_every_layout_validates_and_resumes_alike(trained):
    root, src, runs = trained
    assert runs["first"]["losses"] == runs["full"]["losses"][:3]
    hops = [("tp1pp1", 1, 1, None), ("tp4pp1", 4, 1, None), ("tp2pp2_back", 2, 2, None)]
    previous = src
    for name, tp, pp, vp in hops:
        out = str(root / name)
        proc = convert("--load-dir", previous, "--save-dir", out, "--target-tensor-parallel-size", str(tp),
                       "--target-pipeline-parallel-size", str(pp), "--with-optim")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        previous = out
    # TP2.PP2 -> TP1.PP1 -> TP4 -> TP2.PP2: every tensor, Adam moment and schedule state bit for bit
    it = os.path.join("iter_0000003")
    for shard in sorted(os.listdir(os.path.join(src, it))):
        a = torch.load(os.path.join(src, it, shard, "model_optim_rng.pt"), weights_only=True)
        b = torch.load(os.path.join(previous, it, shard, "model_optim_rng.pt"), weights_only=True)
        for key in ("model", "optimizer", "opt_param_scheduler", "param_meta", "optimizer_params", "iteration"):
            assert _equal(a[key], b[key]) == [], (shard, key)
    # an interleaved target, weights only
    vp = str(root / "tp1pp2vp2")
    proc = convert("--load-dir", src, "--save-dir", vp, "--target-pipeline-parallel-size", "2",
                   "--target-num-layers-per-virtual-pipeline-stage", "1")
    assert proc.returncode == 0 and "weights only" in proc.stdout, proc.stderr

    ref_valid = runs["valid"]["valid"][0]
    one = _merged(1, {"valid_tp1": ["--train-iters", "3", "--load", str(root / "tp1pp1")],
                      "resumed_tp1": ["--train-iters", "6", "--load", str(root / "tp1pp1")]})
    four = _merged(4, {"valid_tp4": layout(4, 1) + ["--train-iters", "3", "--load", str(root / "tp4pp1")]})
    two = _merged(2, {"valid_vp": layout(1, 2, 1) + ["--train-iters", "3", "--load", vp, "--no-load-optim"]})
    for got in (one["valid_tp1"], four["valid_tp4"], two["valid_vp"]):
        assert got["valid"][0] == pytest.approx(ref_valid, rel=1e-5)
    # training continues at the new layout from the converted optimizer state: the original curve
    assert one["resumed_tp1"]["losses"] == pytest.approx(runs["full"]["losses"][3:], rel=1e-5)


def test_loading_another_layout_names_the_conversion_command(trained, tmp_path):
    _, src, _ = trained
    proc = subprocess.run([sys.executable, "-m", "megatron_lite.pretrain_gpt", *BASE, "--train-iters", "4",
                           "--load", src], cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "saved at TP=2 PP=2, this run is TP=1 PP=1" in errors[0]
    assert (f"python tools/checkpoint_convert.py --load-dir {src} --save-dir {src}_tp1_pp1 "
            "--target-tensor-parallel-size 1 --target-pipeline-parallel-size 1") in errors[0]


def test_bad_conversions_are_one_line(trained, tmp_path):
    _, src, _ = trained
    for args, says in [
        (["--load-dir", src, "--save-dir", src], "exists and is not empty"),
        (["--load-dir", str(tmp_path / "nothing"), "--save-dir", str(tmp_path / "o")], "no latest_checkpointed"),
        (["--load-dir", src, "--save-dir", str(tmp_path / "o3"), "--target-tensor-parallel-size", "3"],
         "--num-attention-heads (4) must be divisible by --tensor-model-parallel-size (3)"),
    ]:
        proc = convert(*args)
        errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
        assert proc.returncode != 0 and len(errors) == 1 and says in errors[0], (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "o3") and not os.path.exists(str(tmp_path / "o3") + ".converting")


# ---- HuggingFace ----------------------------------------------------------------------------------
def _our_logits_and_greedy(rank, world, load_dir, ids, steps):
    from megatron_lite.inference.generation import full_logits, generate
    from megatron_lite.inference.loading import load_for_inference

    model = load_for_inference(load_dir)
    logits = full_logits(model, ids)
    greedy = generate(model, [ids], steps)[0].generated if steps else []
    return {"logits": logits[:, :model.cfg.model.vocab_size].clone(), "greedy": greedy}


@pytest.mark.timeout(300)
def test_huggingface_export_has_our_logits_and_greedy_text(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, src, _ = trained
    hf_dir = str(tmp_path / "hf")
    proc = convert("--load-dir", src, "--target", "huggingface", "--save-dir", hf_dir)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(hf_dir)) == ["config.json", "model.safetensors"]  # mock data: no tokenizer files
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    ids = torch.randint(0, 250, (8,), generator=torch.Generator().manual_seed(3)).tolist()  # + 6 new <= seq 16
    ours = run_distributed(_our_logits_and_greedy, 4, args=(src, ids, 6), timeout=200)[0]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
        generated = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 8:]
    assert theirs.shape == ours["logits"].shape
    assert torch.allclose(theirs, ours["logits"], atol=1e-4, rtol=1e-4), (theirs - ours["logits"]).abs().max()
    assert generated.tolist() == ours["greedy"]


@pytest.mark.timeout(300)
def test_huggingface_import_matches_its_logits_at_tp2_and_pp2(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf_dir = tmp_path / "hf_random"
    hf.save_pretrained(hf_dir)  # config.json + model.safetensors
    ids = torch.randint(0, 300, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0]
    for tp, pp in ((2, 1), (1, 2)):
        out = str(tmp_path / f"ours_tp{tp}_pp{pp}")
        proc = convert("--source", "huggingface", "--load-dir", str(hf_dir), "--save-dir", out,
                       "--target-tensor-parallel-size", str(tp), "--target-pipeline-parallel-size", str(pp))
        assert proc.returncode == 0, proc.stderr
        ours = run_distributed(_our_logits_and_greedy, tp * pp, args=(out, ids, 0), timeout=200)[0]
        assert torch.allclose(theirs, ours["logits"], atol=1e-4, rtol=1e-4), (tp, pp)


def test_huggingface_export_refuses_what_gpt2_cannot_express(tmp_path):
    from megatron_lite.errors import CheckpointError
    from megatron_lite.training.hf_gpt2 import check_exportable

    with pytest.raises(CheckpointError, match="--position-embedding-type rope"):
        check_exportable({"position_embedding_type": "rope"})
    with pytest.raises(CheckpointError, match="--untie-embeddings-and-output-weights"):
        check_exportable({"untie_embeddings_and_output_weights": True})


@pytest.mark.timeout(200)
def test_huggingface_export_carries_the_tokenizer(tmp_path, tokenizer_files):
    transformers = pytest.importorskip("transformers")
    vocab, merges, _ = tokenizer_files
    root = str(tmp_path / "ckpt")
    flags = ["--mock-data", "--vocab-file", vocab, "--merge-file", merges, "--num-layers", "1", "--hidden-size", "32",
             "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "1", "--train-iters", "1",
             "--eval-iters", "0", "--save", root]
    proc = subprocess.run([sys.executable, "-m", "megatron_lite.pretrain_gpt", *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    hf_dir = str(tmp_path / "hf")
    proc = convert("--load-dir", root, "--target", "huggingface", "--save-dir", hf_dir)
    assert proc.returncode == 0 and "vocab.json, merges.txt" in proc.stdout, proc.stdout + proc.stderr
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    from megatron_lite.data.tokenizer import build_tokenizer

    ours = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    text = "def parse(line):\n    return line.split(',')  # naïve"
    assert tok(text)["input_ids"] == ours.tokenize(text)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert model.config.vocab_size == ours.vocab_size
