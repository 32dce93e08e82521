"""The entry point end to end: preprocess a corpus with the fixture tokenizer, then
``torchrun -m megatron_lite.pretrain_gpt`` at TP=2 on gloo with full recompute; the loss falls,
the metrics file has every contracted field on every line (MFU from model FLOPs, the recompute
FLOPs apart as HFU), validation lines carry ppl = exp(loss), and the checkpoint lands in
Megatron's layout with the tracker file last.

Failures: user errors end in one ``error:`` line and no traceback, single-process and under
torchrun, including a failure on the last pipeline stage only (that rank names itself; its peer
at most says it lost contact); the in-process cases pin how each kind of exception is reported.
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch.distributed as dist

from dist_helpers import run_entry_point
from megatron_lite import pretrain_gpt
from megatron_lite.config import pad_vocab_size, parse_args, validate
from megatron_lite.parallel.p2p import P2PError
from megatron_lite.parallel.state import ParallelState, free_port
from megatron_lite.training.checkpoint import CheckpointError

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
           "--recompute-granularity", "full", "--recompute-method", "uniform",
           "--log-interval", "5", "--eval-interval", "20", "--eval-iters", "2",
           "--metrics-jsonl", str(metrics), "--tensorboard-dir", str(tmp_path / "tb"), "--peak-tflops", "1.0",
           "--save", str(save), "--save-interval", "20"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=170, cwd=str(tmp_path), env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr

    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in lines if "split" not in r]
    # MFU counts model FLOPs; full recompute of all L layers reruns each forward once, which only the
    # hardware figure (HFU) includes: per layer (8Bshq + 4Bs^2q + 4Bshf), logits 2BshV (B = 8, q = h).
    padded_vocab = int(re.search(r"padded to (\d+)", out.stdout).group(1))
    b, s, h, layers = 8, 32, 64, 2
    layer_fwd = 8 * b * s * h * h + 4 * b * s * s * h + 4 * b * s * h * (4 * h)
    logits_fwd = 2 * b * s * h * padded_vocab
    model_flops = 3 * layers * layer_fwd + 3 * logits_fwd
    hardware_flops = 4 * layers * layer_fwd + 3 * logits_fwd
    valid = [r for r in lines if r.get("split") == "valid"]
    assert [r["iteration"] for r in train] == list(range(5, ITERS + 1, 5))
    for r in train:
        for key in TRAIN_FIELDS:
            assert key in r and r[key] is not None, (key, r)
        assert r["consumed_samples"] == 8 * r["iteration"] and r["skipped_iter"] == 0
        assert r["tokens_per_s"] > 0 and r["tflops_per_device"] > 0
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 1.0)
        # Same iteration time in both: their ratio is the FLOP ratio, and each is FLOPs / (t x 2 ranks).
        assert r["tflops_per_device"] == pytest.approx(model_flops / (r["iter_time_s"] * 2 * 1e12), rel=1e-9)
        assert r["hardware_tflops_per_device"] / r["tflops_per_device"] == pytest.approx(
            hardware_flops / model_flops, rel=1e-9)
        assert r["hfu"] == pytest.approx(r["hardware_tflops_per_device"] / 1.0)
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
                 "number of nan iterations:", "tokens/s:", "TFLOP/s/device:", "MFU:",
                 "hardware TFLOP/s/device:", "HFU:"):
        assert part in it_lines[-1], part
    assert "validation loss at iteration 40" in out.stdout and "lm loss PPL:" in out.stdout
    assert "--peak-tflops 1 TFLOP/s" in out.stdout

    # Checkpoints in Megatron's layout; the tracker names the last one.
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERS)
    for it in (20, 40):
        for tp in (0, 1):
            assert (save / f"iter_{it:07d}" / f"mp_rank_{tp:02d}" / "model_optim_rng.pt").is_file()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))



# ---- failures ---------------------------------------------------------------------------------
TINY = ["--mock-data", "--vocab-size", "256", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--distributed-backend", "gloo", "--distributed-timeout-minutes", "0.2", "--log-interval", "1"]
PP2 = ["--pipeline-model-parallel-size", "2"]
WORKER_FRAME = re.compile(r'File ".*megatron_lite[/\\]')  # torchrun's own traceback has no such frame


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.timeout(120)
def test_missing_data_prefix_and_vocab_file_get_one_line(tmp_path):
    out = run_entry_point(["--data-path", str(tmp_path / "nope_text_document"), "--vocab-file",
                   os.path.join(TOKENIZER, "vocab.json"), "--merge-file", os.path.join(TOKENIZER, "merges.txt")],
                  tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: --data-path: {tmp_path / 'nope_text_document'}.bin does not exist; preprocess the corpus with "
        "tools/preprocess_data.py or fix the prefix (no .bin/.idx suffix)"]

    (tmp_path / "d.bin").write_bytes(b"")
    (tmp_path / "d.idx").write_bytes(b"")
    out = run_entry_point(["--data-path", str(tmp_path / "d"), "--vocab-file", str(tmp_path / "missing_vocab.json"),
                   "--merge-file", os.path.join(TOKENIZER, "merges.txt")], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: --vocab-file: {tmp_path / 'missing_vocab.json'} does not exist or is not a file"]


@pytest.mark.timeout(120)
def test_torchrun_pp2_unwritable_metrics_file_is_caught_before_training(tmp_path):
    """The last stage (rank 1) writes the metrics: validate() refuses the path on every rank, rank 0 says so."""
    (tmp_path / "a_file").write_text("")
    bad = str(tmp_path / "a_file" / "m.jsonl")
    out = run_entry_point(TINY + PP2 + ["--train-iters", "2", "--metrics-jsonl", bad], tmp_path, nproc=2)
    assert out.returncode != 0
    assert _error_lines(out.stderr) == [
        f"error: --metrics-jsonl: cannot write {bad}: {tmp_path / 'a_file'} exists and is not a directory; "
        "choose another path"]
    assert not WORKER_FRAME.search(out.stderr) and "[rank1]: Traceback" not in out.stderr, out.stderr
    assert "> layout" not in out.stdout  # failed before any process group or model was built


def _write_first_stage_checkpoint(root, iteration):
    """A real PP=2 checkpoint's stage-0 shard and tracker, without the last stage's shard."""
    from megatron_lite.model.gpt import build_model_chunks
    from megatron_lite.parallel.random import model_parallel_seed
    from megatron_lite.training.checkpoint import save_checkpoint

    cfg = validate(parse_args(TINY + PP2), 2)
    cfg.model.padded_vocab_size = pad_vocab_size(256, cfg.model.make_vocab_size_divisible_by, 1)
    ps = ParallelState(world_size=2, rank=0, pp_size=2, pp_rank=0, pp_ranks=[0, 1], embedding_ranks=[0, 1])
    model_parallel_seed(cfg.train.seed, ps)
    save_checkpoint(str(root), iteration, build_model_chunks(cfg, ps), None, None, iteration * 4, cfg.to_dict(), ps)


@pytest.mark.timeout(150)
def test_torchrun_pp2_error_on_last_stage_only_is_printed_by_that_rank(tmp_path):
    ckpt = tmp_path / "ckpt"
    _write_first_stage_checkpoint(ckpt, 5)
    assert sorted(os.listdir(ckpt / "iter_0000005")) == ["mp_rank_00_000"]
    out = run_entry_point(TINY + PP2 + ["--train-iters", "8", "--load", str(ckpt)], tmp_path, nproc=2)
    assert out.returncode != 0
    errors = _error_lines(out.stderr)
    own = [line for line in errors if line.startswith("error: [rank 1] ")]
    assert own == [f"error: [rank 1] --load {ckpt}: iteration 5 has no shard "
                   f"{os.path.join('iter_0000005', 'mp_rank_00_001', 'model_optim_rng.pt')} (found "
                   "['mp_rank_00_000']); the checkpoint is incomplete (an interrupted copy?)"], out.stderr
    # Rank 0 loaded its shard and then lost its peer: at most one line, never a traceback.
    assert errors.count(own[0]) == 1 and len(errors) <= 2
    assert set(errors) - set(own) <= {"error: [rank 0] lost contact with another rank (its own error is "
                                      "printed above)"}, errors
    assert "> loaded checkpoint from" in out.stdout  # stage 0 got past its load
    assert not WORKER_FRAME.search(out.stderr) and "[rank0]: Traceback" not in out.stderr, out.stderr


# In-process: how main() reports each kind of failure, on rank 1 of 2 after the groups exist.
def _p2p_failure():
    try:
        raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:20357")
    except RuntimeError as e:
        try:
            raise P2PError("pipeline stage 0 (rank 0) could not send activation to next stage") from e
        except P2PError as wrapped:
            return wrapped


LOST = "error: [rank 1] lost contact with another rank (its own error is printed above)"
REPORTED = [
    (CheckpointError("--load /c: iteration 5 has no shard x\nsecond line"), 2,
     ["error: [rank 1] --load /c: iteration 5 has no shard x"]),
    (PermissionError(13, "Permission denied", "/out/m.jsonl"), 2, ["error: [rank 1] /out/m.jsonl: Permission denied"]),
    (dist.DistBackendError("NCCL watchdog: collective operation failed"), 1, [LOST]),
    (dist.DistNetworkError("Connection reset by peer"), 1, [LOST]),
    (RuntimeError("[gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:1234. This is typically caused by "
                  "a remote worker crashing."), 1, [LOST]),
    (_p2p_failure(), 1, [LOST]),
    (RuntimeError("[gloo/unbound_buffer.cc:81] Timed out waiting 12000ms for recv operation to complete"), 1,
     ["error: [rank 1] timed out waiting for another rank (--distributed-timeout-minutes); that rank failed "
      "(its own error is printed above) or is stuck"]),
]


@pytest.mark.parametrize("exc,status,lines", REPORTED, ids=[type(r[0]).__name__ + str(i) for i, r in
                                                           enumerate(REPORTED)])
def test_rank_reports_its_own_error_or_lost_contact(monkeypatch, capsys, exc, status, lines):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def failing_pretrain(cfg, world_size=None):
        raise exc
    monkeypatch.setattr(pretrain_gpt, "pretrain_gpt", failing_pretrain)
    assert pretrain_gpt.main(TINY) == status
    captured = capsys.readouterr()
    assert captured.err.splitlines() == lines and captured.out == ""


@pytest.mark.parametrize("exc", [ValueError("a bug"), P2PError("activation to send has shape (1,)"),
                                 RuntimeError("Connection closed by peer")])
def test_bugs_keep_their_traceback(monkeypatch, capsys, exc):
    """Other exceptions, a P2PError not caused by a transfer (a wrong shape here) and, in a single
    process (no peers to lose), even a connection error propagate with their traceback."""
    single = "Connection" in str(exc)
    monkeypatch.setenv("RANK", "0" if single else "1")
    monkeypatch.setenv("WORLD_SIZE", "1" if single else "2")

    def failing_pretrain(cfg, world_size=None):
        raise exc
    monkeypatch.setattr(pretrain_gpt, "pretrain_gpt", failing_pretrain)
    with pytest.raises(type(exc)):
        pretrain_gpt.main(TINY)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("rank", [0, 1])
def test_config_error_before_groups_is_printed_by_rank0_only(monkeypatch, capsys, rank):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("megatron_lite.cli.RANK0_FIRST_DELAY_S", 0.0)
    assert pretrain_gpt.main(TINY + ["--hidden-size", "30"]) == 2
    expected = ["error: --hidden-size (30) must be divisible by --num-attention-heads (4)"] if rank == 0 else []
    assert capsys.readouterr().err.splitlines() == expected
