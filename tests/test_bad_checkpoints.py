"""Bad checkpoints, as a user meets them: each is refused by ``python -m megatron_lite.pretrain_gpt``
with one ``error:`` line naming the file or flag (exit 2, no traceback, no torch.load advice), and
the checkpoint is left byte-identical. A resume in another precision loads the weights, says that
the masters are rebuilt, and trains on; a --load directory that does not exist starts from scratch.

One real checkpoint of the tiny model is trained once per module and copied for each test."""
import contextlib
import hashlib
import io
import os
import shutil
import subprocess

import pytest
import torch

from conftest import ROOT
from dist_helpers import run_entry_point

BASE = ["--mock-data", "--vocab-size", "256", "--make-vocab-size-divisible-by", "64",
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "3e-3",
        "--hidden-dropout", "0.0", "--attention-dropout", "0.0",
        "--log-interval", "100", "--eval-interval", "100", "--eval-iters", "0", "--seed", "3",
        "--distributed-backend", "gloo"]
TRACKER = "latest_checkpointed_iteration.txt"
SHARD = os.path.join("iter_0000002", "mp_rank_00", "model_optim_rng.pt")


def _run(args):
    """``main(args)`` of ``python -m megatron_lite.pretrain_gpt`` in this process (it imports torch once,
    not once per case); the environment it sets for its one-rank group is put back afterwards.
    ``test_shard_that_is_not_a_dict`` runs the real command line in a subprocess."""
    from megatron_lite.pretrain_gpt import main

    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(env)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained") / "ckpt"
    r = _run(BASE + ["--train-iters", "2", "--save", str(root)])
    assert r.returncode == 0, r.stderr
    assert (root / SHARD).is_file()
    return root


@pytest.fixture
def ckpt(trained, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(trained, root)
    return root


def _digest(root) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _subprocess(args):
    return run_entry_point(args, cwd=ROOT, timeout=180)


def _refused(root, extra=(), load=None, must_name=(), run=_run):
    """Resume from ``root`` (or ``load``): one error line naming each of ``must_name``; files untouched."""
    before = _digest(root) if os.path.isdir(root) else None
    r = run(BASE + ["--train-iters", "3", "--load", str(load or root), *extra])
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert "weights_only" not in r.stderr + r.stdout
    for name in must_name:
        assert name in errors[0], (name, errors[0])
    if before is not None:
        assert _digest(root) == before
    return errors[0]


def _rewrite_shard(root, edit):
    path = root / SHARD
    state = torch.load(path, map_location="cpu", weights_only=True)
    torch.save(edit(state), path)
    return path


def test_shard_that_is_not_a_dict(ckpt):
    path = _rewrite_shard(ckpt, lambda state: [1, 2, 3])
    _refused(ckpt, must_name=[str(path)], run=_subprocess)  # the real command line, once


def test_shard_without_model_entry(ckpt):
    path = _rewrite_shard(ckpt, lambda state: {k: v for k, v in state.items() if k != "model"})
    line = _refused(ckpt, must_name=[str(path), "'model'"])
    assert "not a megatron_lite checkpoint" in line


def test_shard_with_another_programs_names(ckpt):
    def rename(state):
        state["model"] = {"transformer." + k: v for k, v in state["model"].items()}
        return state
    path = _rewrite_shard(ckpt, rename)
    line = _refused(ckpt, must_name=[str(path), "missing", "transformer.embedding.word_embeddings.weight"])
    assert "more)" in line  # a few names, not all of them


def test_shard_with_wrong_shapes(ckpt):
    def reshape(state):
        w = state["model"]["embedding.word_embeddings.weight"]
        state["model"]["embedding.word_embeddings.weight"] = torch.zeros(w.shape[0] + 64, w.shape[1])
        return state
    path = _rewrite_shard(ckpt, reshape)
    _refused(ckpt, must_name=[str(path), "embedding.word_embeddings.weight", "[320, 64]", "[256, 64]"])


def test_shard_with_damaged_optimizer_state(ckpt):
    def damage(state):
        state["optimizer"] = {"optimizer": {"state": {}, "param_groups": []}}
        return state
    path = _rewrite_shard(ckpt, damage)
    _refused(ckpt, must_name=[str(path), "optimizer state"])


def test_truncated_shard(ckpt):
    path = ckpt / SHARD
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(ckpt, must_name=[str(path), "truncated"])


def test_empty_shard(ckpt):
    path = ckpt / SHARD
    path.write_bytes(b"")
    _refused(ckpt, must_name=[str(path), "empty"])


def test_tracker_not_utf8(ckpt):
    (ckpt / TRACKER).write_bytes(b"\xff\xfe\x00\x81")
    line = _refused(ckpt, must_name=[TRACKER, "UTF-8"])
    assert "parallel" not in line


def test_tracker_not_a_number(ckpt):
    (ckpt / TRACKER).write_text("abc")
    line = _refused(ckpt, must_name=[TRACKER, "'abc'"])
    assert "parallel" not in line


def test_tracker_naming_a_missing_iteration_is_not_blamed_on_the_layout(ckpt):
    (ckpt / TRACKER).write_text("7")
    line = _refused(ckpt, must_name=[TRACKER, "iter_0000007", "does not exist"])
    assert "parallel" not in line


def test_load_at_a_plain_file(ckpt):
    _refused(ckpt, load=ckpt / SHARD, must_name=["--load", str(ckpt / SHARD), "not a checkpoint directory"])


def test_another_model_shape_names_the_flags(ckpt):
    line = _refused(ckpt, extra=["--hidden-size", "128"], must_name=[str(ckpt / SHARD)])
    assert "--hidden-size: checkpoint 64, this run 128" in line
    assert "--ffn-hidden-size: checkpoint 256, this run 512" in line


def test_another_layer_count_and_vocabulary(ckpt):
    line = _refused(ckpt, extra=["--num-layers", "3", "--vocab-size", "300"])
    assert "--num-layers: checkpoint 2, this run 3" in line
    assert "checkpoint 256, this run 320" in line


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_resume_in_another_precision_rebuilds_the_masters(ckpt, precision):
    before = _digest(ckpt)
    r = _run(BASE + ["--train-iters", "3", "--load", str(ckpt), precision])
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Traceback" not in r.stderr and "weights_only" not in r.stderr + r.stdout
    assert "saved in fp32" in r.stdout and "rebuilt from the weights" in r.stdout, r.stdout
    assert "loaded checkpoint" in r.stdout and "at iteration 2" in r.stdout
    assert _digest(ckpt) == before


def test_missing_load_directory_starts_from_scratch(tmp_path):
    missing = tmp_path / "nowhere"
    r = _run(BASE + ["--train-iters", "1", "--load", str(missing)])
    assert r.returncode == 0, r.stderr[-4000:]
    assert "training from scratch" in r.stdout
    assert not missing.exists()
