"""The example scripts, run as a user would.

The GPU scripts cannot train here; with DRY_RUN=1 they push their exact flags through the parser and
validator at their real world size. The quickstart runs end to end with few iterations.
"""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

GPU_SCRIPTS = {
    "pretrain_gpt_345m_1gpu.sh": {},
    "pretrain_gpt_1.3b_tp4_8gpu.sh": {},
    "pretrain_gpt_multinode.sh": {"NNODES": "2", "MASTER_ADDR": "127.0.0.1"},
    "pretrain_gpt_slurm.sh": {"SLURM_JOB_NODELIST": "gpu-node[07-10],login3", "SLURM_NNODES": "4",
                              "SLURM_JOB_ID": "4242"},
}


def _dummy_inputs(tmp_path):
    prefix = tmp_path / "corpus_text_document"
    for ext in (".bin", ".idx"):
        (tmp_path / f"corpus_text_document{ext}").write_bytes(b"")
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return dict(DATA_PATH=str(prefix), VOCAB_FILE=str(tmp_path / "vocab.json"),
                MERGE_FILE=str(tmp_path / "merges.txt"), CHECKPOINT_PATH=str(tmp_path / "ckpt"))


@pytest.mark.parametrize("script", sorted(GPU_SCRIPTS))
def test_gpu_example_flags_validate(script, tmp_path):
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, **_dummy_inputs(tmp_path), **GPU_SCRIPTS[script])
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", script)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dry run" in r.stdout.lower(), r.stdout
    assert "Traceback" not in r.stderr


def test_slurm_example_meets_at_the_first_node_at_the_job_world_size(tmp_path):
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, **_dummy_inputs(tmp_path),
               **GPU_SCRIPTS["pretrain_gpt_slurm.sh"])
    for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PATH"] = "/usr/bin:/bin:" + os.path.dirname(sys.executable)  # no scontrol: the nodelist is parsed
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "pretrain_gpt_slurm.sh")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "world size 32: TP=4 PP=2 DP=4" in r.stdout  # 4 nodes x 8 GPUs / (TP 4 x PP 2)
    assert "--rdzv-endpoint gpu-node07:29500" in r.stdout and "--rdzv-id 4242" in r.stdout, r.stdout
    assert "srun --nodes=4 --ntasks-per-node=1" in r.stdout


def test_static_multinode_example_needs_node_rank(tmp_path):
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, RDZV="static", **_dummy_inputs(tmp_path),
               **GPU_SCRIPTS["pretrain_gpt_multinode.sh"])
    env.pop("NODE_RANK", None)
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "pretrain_gpt_multinode.sh")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "NODE_RANK" in r.stderr
    env["NODE_RANK"] = "1"
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "pretrain_gpt_multinode.sh")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--node-rank 1 --master-addr 127.0.0.1" in r.stdout, r.stderr


def test_gpu_example_without_data_path_is_clear(tmp_path):
    env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable)
    for k in ("DATA_PATH", "VOCAB_FILE", "MERGE_FILE"):
        env.pop(k, None)
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "pretrain_gpt_345m_1gpu.sh")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DATA_PATH" in r.stderr


@pytest.mark.timeout(600)
def test_quickstart_end_to_end(tmp_path):
    """The README's first command, shortened: demo corpus -> tokenizer -> shards -> TP=2 training -> sample."""
    env = dict(os.environ, WORK_DIR=str(tmp_path / "qs"), TRAIN_ITERS="30",
               MEGATRON_LITE_VENV=sys.prefix, MASTER_PORT=str(_free_port()))
    r = subprocess.run(["bash", os.path.join(ROOT, "examples", "quickstart.sh")], env=env,
                       capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "validation" in out.lower() and "--- prompt:" in out, out[-3000:]
    assert (tmp_path / "qs" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert (tmp_path / "qs" / "demo_text_document.bin").stat().st_size > 0


def _free_port():
    from megatron_lite.parallel.state import free_port
    return free_port()
