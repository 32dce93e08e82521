"""tools/run_text_generation_server.py: Megatron-LM's PUT /api served by rank 0 of a TP=2 run.

Concurrent valid requests get the tokens tools/generate_text.py prints for the same prompts;
malformed ones (bad JSON, wrong types, too many tokens, empty prompts, unknown fields, a body
over the limit, a wrong path) get a 4xx JSON error; the server is still up after all of them and
stops cleanly on SIGTERM.
"""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT
from dist_helpers import free_port, run_entry_point

TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
TRAIN = ["--mock-data", "--vocab-file", os.path.join(TOKENIZER, "vocab.json"),
         "--merge-file", os.path.join(TOKENIZER, "merges.txt"), "--make-vocab-size-divisible-by", "64",
         "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "48",
         "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "1", "--lr", "0", "--min-lr", "0",
         "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-iters", "0", "--seed", "3",
         "--init-method-std", "0.2", "--distributed-backend", "gloo", "--tensor-model-parallel-size", "2"]
PROMPTS = ["Return the", "def main", "import os\nimport"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _call(port, body, method="PUT", path="/api", raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_up(port, proc, deadline=120):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{proc.stderr.read()[-3000:]}")
        try:
            if _call(port, None, method="GET", path="/health")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.5)
    raise AssertionError("server did not come up")


@pytest.mark.timeout(400)
def test_server_answers_like_generate_text_and_survives_bad_requests(tmp_path):
    load = str(tmp_path / "ckpt")
    r = run_entry_point(TRAIN + ["--save", load], tmp_path, nproc=2, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(free_port()), "tools/run_text_generation_server.py",
                               "--load", load, "--port", str(port), "--max-request-bytes", "4096",
                               "--max-tokens-to-generate", "40"],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_up(port, server)
        valid = [{"prompts": [p], "tokens_to_generate": 10, "top_k": 1, "logprobs": True} for p in PROMPTS]
        bad = [
            (None, b"{not json", "JSON"),
            ({"prompts": "Return the"}, None, "prompts"),
            ({"prompts": [3]}, None, "prompts"),
            ({"prompts": [""]}, None, "empty"),
            ({"prompts": []}, None, "prompts"),
            ({"prompts": ["a"], "tokens_to_generate": "10"}, None, "tokens_to_generate"),
            ({"prompts": ["a"], "tokens_to_generate": 41}, None, "tokens_to_generate"),
            ({"prompts": ["word " * 40], "tokens_to_generate": 40}, None, "positions"),
            ({"prompts": ["a"], "top_p": 2}, None, "top_p"),
            ({"prompts": ["a"], "logprobs": "yes"}, None, "logprobs"),
            ({"prompts": ["a"], "tokens": 3}, None, "unknown"),
            (None, json.dumps({"prompts": ["x" * 5000]}).encode(), "bytes"),
        ]
        with ThreadPoolExecutor(8) as pool:
            good = [pool.submit(_call, port, b) for b in valid + valid]
            errs = [pool.submit(_call, port, b, raw=raw) for b, raw, _ in bad]
            wrong_path = pool.submit(_call, port, {"prompts": ["a"]}, path="/generate")
            good = [f.result() for f in good]
            errs = [f.result() for f in errs]
        for (status, body), (_, _, says) in zip(errs, bad):
            assert 400 <= status < 500 and says in body["error"], (status, body, says)
        assert wrong_path.result()[0] == 404
        for status, body in good:
            assert status == 200, body
        assert good[:3] == good[3:]  # the same request twice, concurrently: the same answer
        assert _call(port, None, method="GET", path="/health")[0] == 200  # still up

        cli = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", str(free_port()), "tools/generate_text.py", "--load", load,
                              "--max-new-tokens", "10", "--output-json", str(tmp_path / "gen.json")]
                             + [a for p in PROMPTS for a in ("--prompt", p)],
                             cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=180)
        assert cli.returncode == 0, cli.stderr[-3000:]
        expected = json.loads((tmp_path / "gen.json").read_text())
        for (_, body), exp in zip(good, expected):
            assert body["tokens"][0] == exp["tokens"]
            assert body["text"][0] == exp["prompt"] + exp["text"]
            assert body["logprobs"][0] == pytest.approx(exp["logprobs"], abs=1e-5)
        sampled = [_call(port, {"prompts": PROMPTS, "tokens_to_generate": 8, "top_p": 0.9, "random_seed": 5})
                   for _ in range(2)]
        assert sampled[0] == sampled[1] and sampled[0][0] == 200
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            out, err = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            out, err = server.communicate()
    assert "server stopped" in out, err[-3000:]
