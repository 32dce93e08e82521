"""Every bad flag combination gets one clear ConfigError naming the flags; the entry point turns
user errors into a single ``error: ...`` line on stderr, exit status 2 and no traceback."""
import os

import pytest
import torch

from dist_helpers import run_entry_point
from megatron_lite.config import ConfigError, parse_args, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
MOCK = ["--mock-data", "--vocab-size", "256", "--num-layers", "4", "--hidden-size", "64",
        "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2"]


def tp(n):
    return ["--tensor-model-parallel-size", str(n)]


def pp(n):
    return ["--pipeline-model-parallel-size", str(n)]


# (extra flags, world size, a fragment the message must contain)
BAD = [
    (tp(3) + ["--num-attention-heads", "4"], 3,
     "--num-attention-heads (4) must be divisible by --tensor-model-parallel-size (3)"),
    (["--hidden-size", "66"], 1, "--hidden-size (66) must be divisible by --num-attention-heads (4)"),
    (["--global-batch-size", "6"], 2,
     "--global-batch-size (6) must be divisible by --micro-batch-size (2) x data-parallel size (2) = 4"),
    (["--seq-length", "64", "--max-position-embeddings", "32"], 1,
     "--seq-length (64) exceeds --max-position-embeddings (32)"),
    (tp(2), 3, "world size 3 is not divisible by --tensor-model-parallel-size (2)"),
    (["--fp16", "--bf16"], 1, "--fp16 and --bf16 are exclusive"),
    (tp(4) + ["--sequence-parallel", "--seq-length", "18"], 4,
     "--sequence-parallel needs --seq-length (18) divisible"),
    (["--recompute-method", "uniform"], 1, "--recompute-method needs --recompute-granularity full"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "5"], 1,
     "--lr-warmup-fraction and --lr-warmup-iters are exclusive"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], 1, "--min-lr (0.001) must not exceed --lr (0.0001)"),
    (["--train-iters", "10", "--lr-warmup-iters", "20"], 1, "--lr-warmup-iters (20) exceeds the decay span"),
    (["--eval-iters", "-1"], 1, "--eval-iters must be >= 0"),
    # pipeline layouts
    (pp(3), 3, "--num-layers (4) cannot be split evenly over --pipeline-model-parallel-size (3)"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], 1,
     "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1"),
    (["--decoder-first-pipeline-num-layers", "1"], 1,
     "--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1"),
    (pp(2) + ["--num-layers-per-virtual-pipeline-stage", "3"], 2,
     "must be divisible by --num-layers-per-virtual-pipeline-stage (3)"),
    (pp(2) + ["--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "6"], 2,
     "the interleaved schedule needs the number of micro-batches (3"),
    (pp(2) + ["--num-layers-per-virtual-pipeline-stage", "2"], 2,
     "--num-layers-per-virtual-pipeline-stage (2) leaves one model chunk per stage"),
    (pp(2) + ["--pipeline-schedule", "interleaved"], 2,
     "--pipeline-schedule interleaved needs --num-layers-per-virtual-pipeline-stage"),
    (pp(2) + ["--decoder-first-pipeline-num-layers", "5"], 2, "cannot be split evenly"),
    # numeric ranges
    (["--make-vocab-size-divisible-by", "0"], 1, "--make-vocab-size-divisible-by must be >= 1, got 0"),
    (["--init-method-std", "0"], 1, "--init-method-std must be > 0"),
    (["--init-method-std", "-0.02"], 1, "--init-method-std must be > 0"),
    (["--global-batch-size", "0"], 1, "--global-batch-size must be >= 1, got 0"),
    (["--ffn-hidden-size", "0"], 1, "--ffn-hidden-size must be >= 1, got 0"),
    (["--lr=-1e-4", "--min-lr=-1e-3"], 1, "--lr must be >= 0, got -0.0001"),
    (["--min-lr=-1e-5"], 1, "--min-lr must be >= 0, got -1e-05"),
    # hidden 60 / 4 heads = 15: rotary embeddings rotate channel pairs
    (["--position-embedding-type", "rope", "--hidden-size", "60"], 1,
     "--position-embedding-type rope rotates pairs of channels, so the head dimension (--hidden-size 60 / "
     "--num-attention-heads 4 = 15) must be even"),
    (["--distributed-backend", "nccl"], 1, "--distributed-backend nccl needs CUDA"),
]


@pytest.mark.parametrize("extra,world,fragment", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_combination_message(extra, world, fragment):
    if "nccl" in extra and torch.cuda.is_available():
        pytest.skip("CUDA is available here, so --distributed-backend nccl is valid")
    with pytest.raises(ConfigError) as info:
        validate(parse_args(MOCK + extra), world)
    assert fragment in str(info.value)


def test_rope_with_even_head_dim_and_default_softmax_precision_are_accepted():
    cfg = validate(parse_args(MOCK + ["--position-embedding-type", "rope", "--hidden-size", "56",
                                      "--num-attention-heads", "4"]), 1)  # head dim 14
    assert cfg.model.kv_channels == 14
    # Megatron-LM's default: the softmax runs in the input dtype unless the flag asks for fp32.
    assert cfg.model.attention_softmax_in_fp32 is False
    assert parse_args(MOCK + ["--attention-softmax-in-fp32"]).model.attention_softmax_in_fp32 is True


# (flag, path under tmp_path ({file} is an existing regular file), fragment of the message)
BAD_OUTPUT = [
    ("--save", "{file}/ckpt", "--save: cannot write {file}/ckpt: {file} exists and is not a directory"),
    ("--tensorboard-dir", "{file}/tb/run1",
     "--tensorboard-dir: cannot write {file}/tb/run1: {file} exists and is not a directory"),
    ("--metrics-jsonl", "{file}/logs/m.jsonl",
     "--metrics-jsonl: cannot write {file}/logs/m.jsonl: {file} exists and is not a directory"),
    ("--metrics-jsonl", "{dir}", "--metrics-jsonl: {dir} is a directory; give a file path"),
    ("--save", "{file}", "--save: cannot write {file}: {file} exists and is not a directory"),
]


@pytest.mark.parametrize("flag,path,fragment", BAD_OUTPUT, ids=[f"{b[0]}:{b[1]}" for b in BAD_OUTPUT])
def test_unwritable_output_path_is_refused_before_training(tmp_path, flag, path, fragment):
    names = {"file": str(tmp_path / "a_file"), "dir": str(tmp_path)}
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(ConfigError) as info:
        validate(parse_args(MOCK + [flag, path.format(**names)]), 1)
    assert fragment.format(**names) in str(info.value)


@pytest.mark.parametrize("split", ["80,,20", "inf,1,1", "1,2,3,4", "a,b"])
def test_split_is_checked_by_the_parser_the_datasets_use(tmp_path, split):
    prefix = str(tmp_path / "corpus")
    for ext in (".bin", ".idx"):  # validate() checks only that the pair exists
        open(prefix + ext, "wb").close()
    argv = [a for a in MOCK if a != "--mock-data"] + [
        "--data-path", prefix, "--split", split, "--vocab-file", os.path.join(TOKENIZER, "vocab.json"),
        "--merge-file", os.path.join(TOKENIZER, "merges.txt")]
    with pytest.raises(ConfigError, match=f"--split .*got '{split}'"):
        validate(parse_args(argv), 1)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
@pytest.mark.parametrize("flag,path", [("--metrics-jsonl", "/proc/nope/m.jsonl"), ("--save", "/proc/nope/ckpt"),
                                       ("--tensorboard-dir", "/proc/nope")])
def test_output_path_on_an_unwritable_filesystem(flag, path):
    # /proc refuses new files even to root, for whom os.access() says yes: validate probes for real.
    with pytest.raises(ConfigError, match=f"{flag}: cannot write {path}: /proc is not writable \\(.*\\); "
                                          "choose a writable location"):
        validate(parse_args(MOCK + [flag, path]), 1)


def test_creatable_output_paths_pass_and_nothing_is_left_behind(tmp_path):
    args = ["--save", str(tmp_path / "new" / "ckpt"), "--tensorboard-dir", str(tmp_path / "tb"),
            "--metrics-jsonl", str(tmp_path / "logs" / "m.jsonl")]
    validate(parse_args(MOCK + args), 1)
    assert os.listdir(tmp_path) == []  # validation creates nothing (its write probe is removed)


def test_nonexistent_data_prefix(tmp_path):
    prefix = str(tmp_path / "missing_text_document")
    args = ["--data-path", prefix, "--vocab-file", os.path.join(TOKENIZER, "vocab.json"),
            "--merge-file", os.path.join(TOKENIZER, "merges.txt")]
    with pytest.raises(ConfigError, match="--data-path: .*missing_text_document.bin does not exist"):
        validate(parse_args(args), 1)


def test_missing_vocab_file(tmp_path):
    (tmp_path / "d.bin").write_bytes(b"")
    (tmp_path / "d.idx").write_bytes(b"")
    args = ["--data-path", str(tmp_path / "d"), "--vocab-file", str(tmp_path / "nope.json"),
            "--merge-file", os.path.join(TOKENIZER, "merges.txt")]
    with pytest.raises(ConfigError, match=r"--vocab-file: .*nope.json does not exist"):
        validate(parse_args(args), 1)
    with pytest.raises(ConfigError, match="--vocab-file is required"):
        validate(parse_args(["--data-path", str(tmp_path / "d")]), 1)


def test_good_layout_fills_derived_fields():
    cfg = validate(parse_args(MOCK + tp(2) + pp(2) + ["--global-batch-size", "8"]), 8)
    assert cfg.parallel.data_parallel_size == 2 and cfg.parallel.pipeline_schedule == "1f1b"


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.timeout(120)
def test_entry_point_reports_one_line_per_error(tmp_path):
    # A config error (before any process group) ...
    out = run_entry_point(MOCK + ["--hidden-size", "66"], tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: --hidden-size (66) must be divisible by --num-attention-heads (4)"]

    # ... and a bad tokenizer file found after the process group is up.
    (tmp_path / "d.bin").write_bytes(b"")
    (tmp_path / "d.idx").write_bytes(b"")
    (tmp_path / "vocab.json").write_text("this is not json")
    out = run_entry_point(["--data-path", str(tmp_path / "d"), "--vocab-file", str(tmp_path / "vocab.json"),
                            "--merge-file", os.path.join(TOKENIZER, "merges.txt")], tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "vocab.json" in lines[0], lines


@pytest.mark.timeout(120)
def test_torchrun_error_printed_once(tmp_path):
    """Under torchrun every rank exits non-zero; only rank 0 prints the message."""
    out = run_entry_point(MOCK + tp(2) + ["--num-attention-heads", "3", "--hidden-size", "63"], tmp_path, nproc=2)
    assert out.returncode != 0
    assert _error_lines(out.stderr) == [
        "error: --num-attention-heads (3) must be divisible by --tensor-model-parallel-size (2)"]
    assert "exitcode  : 2" in out.stderr  # torchrun's own summary names the workers' status


@pytest.mark.parametrize("flags,named", [
    (["--overlap-param-gather"], "--use-distributed-optimizer"),  # ZeRO-1's all-gather: needs ZeRO-1
    (["--ddp-bucket-size", "0"], "--ddp-bucket-size"),
])
def test_data_parallel_flag_rules(flags, named):
    cfg = parse_args(["--mock-data", "--vocab-size", "128", *flags])
    with pytest.raises(ConfigError, match=named):
        validate(cfg, 1)


def test_data_parallel_flags_are_accepted():
    cfg = parse_args(["--mock-data", "--vocab-size", "128", "--use-distributed-optimizer", "--overlap-grad-reduce",
                      "--overlap-param-gather", "--ddp-bucket-size", "1000", "--tensor-model-parallel-size", "2"])
    validate(cfg, 8)
    ddp = cfg.parallel.ddp_config()
    assert cfg.parallel.data_parallel_size == 4
    assert (ddp.use_distributed_optimizer, ddp.overlap_grad_reduce, ddp.overlap_param_gather, ddp.bucket_size) == \
        (True, True, True, 1000)
