#!/usr/bin/env python3
"""Serve a checkpoint over Megatron-LM's text-generation REST API (rank 0 listens, every rank decodes).

    torchrun --nproc_per_node 2 tools/run_text_generation_server.py --load work_dirs/quickstart/checkpoints --port 5000
    curl -X PUT http://127.0.0.1:5000/api -H 'Content-Type: application/json' \
        -d '{"prompts": ["Return the number of"], "tokens_to_generate": 32, "top_k": 1}'

Fields: prompts (list of strings), tokens_to_generate (default 64), temperature (default 1.0),
top_k (0: no limit, 1: greedy), top_p (0: off), logprobs (false), random_seed. A malformed
request gets a 4xx JSON {"error": ...}; concurrent requests are queued and answered in turn.
Ctrl-C (or SIGTERM) stops every rank.
"""
from __future__ import annotations

import argparse
import signal
import sys

from megatron_lite.cli import EXIT_USAGE, run_distributed_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Megatron-LM-compatible text generation server.")
    p.add_argument("--load", required=True, help="checkpoint directory")
    p.add_argument("--vocab-file", default=None, help="default: the one the checkpoint was trained with")
    p.add_argument("--merge-file", default=None)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--max-request-bytes", type=int, default=1 << 20)
    p.add_argument("--max-prompts", type=int, default=128, help="prompts per request")
    p.add_argument("--max-tokens-to-generate", type=int, default=1024)
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting; beyond it: 503")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return p.parse_args(argv)


def run(args) -> int:
    from megatron_lite.errors import ConfigError
    from megatron_lite.inference.loading import load_with_tokenizer
    from megatron_lite.inference.server import ServerLimits, TextGenerationServer, follow, from_rank0

    for flag in ("max_request_bytes", "max_prompts", "max_tokens_to_generate", "max_queue"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: give 1..65535")
    model, tok = load_with_tokenizer(args.load, args.vocab_file, args.merge_file, args.device)
    ps = model.pstate
    server, problem = None, None
    if ps.rank == 0:
        limits = ServerLimits(args.max_request_bytes, args.max_prompts, args.max_tokens_to_generate, args.max_queue)
        try:
            server = TextGenerationServer(model, tok, args.host, args.port, limits)
        except OSError as e:
            problem = (f"--host {args.host} --port {args.port}: cannot listen ({e.strerror or e}); "
                       "choose a free port")
    # Every rank learns whether rank 0 could listen before the followers start waiting on it.
    problem = from_rank0(problem)
    if problem is not None:
        if ps.rank == 0:
            raise ConfigError(problem)
        return EXIT_USAGE
    if ps.rank != 0:
        # torchrun forwards a stop signal to every worker; followers leave when rank 0 says stop.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        follow(model, tok)
        return 0
    print(f"loaded iteration {model.iteration} from {args.load} (TP={ps.tp_size} PP={ps.pp_size})", flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    server.serve()
    print("server stopped", flush=True)
    return 0



def main(argv=None) -> int:
    args = parse_args(argv)
    return run_distributed_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
