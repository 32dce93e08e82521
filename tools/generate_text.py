#!/usr/bin/env python3
"""Evaluate and sample from a checkpoint with the layout it was saved with (TP ranks via torchrun).

    torchrun --nproc_per_node 2 tools/generate_text.py --load work_dirs/quickstart/checkpoints \
        --vocab-file vocab.json --merge-file merges.txt --prompt "Return the number of" \
        --max-new-tokens 40 [--eval-data-path PREFIX --eval-iters 10]

Greedy decoding recomputes the whole (at most --seq-length) context each step: simple and exact,
meant for checking a trained model, not for serving.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from megatron_lite.config import Config, pad_vocab_size
from megatron_lite.data.tokenizer import TokenizerError, build_tokenizer
from megatron_lite.parallel.mappings import gather_from_tp
from megatron_lite.parallel.state import ParallelConfigError, destroy_parallel, initialize_parallel
from megatron_lite.training.checkpoint import (CheckpointError, checkpoint_file,
                                               load_checkpoint, read_latest_iteration)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate and greedily sample from a megatron_lite checkpoint.")
    p.add_argument("--load", required=True, help="checkpoint directory (with latest_checkpointed_iteration.txt)")
    p.add_argument("--vocab-file", default=None, help="default: the one the checkpoint was trained with")
    p.add_argument("--merge-file", default=None)
    p.add_argument("--prompt", action="append", default=None, help="may be given several times")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--eval-data-path", default=None, help="preprocessed prefix: report validation loss / PPL")
    p.add_argument("--eval-iters", type=int, default=10)
    return p.parse_args(argv)


def saved_config(load_dir: str) -> Config:
    iteration = read_latest_iteration(load_dir)
    if iteration is None:
        raise CheckpointError(f"--load {load_dir}: no latest_checkpointed_iteration.txt; is this a checkpoint?")
    path = checkpoint_file(load_dir, iteration, 0, 0, 1)
    if not os.path.isfile(path):
        path = checkpoint_file(load_dir, iteration, 0, 0, 2)  # any PP>1 name carries the same args
    state = torch.load(path, map_location="cpu", weights_only=True)
    return Config.from_dict(state["args"])


@torch.no_grad()
def next_token_logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    pos = torch.arange(tokens.shape[1]).unsqueeze(0)
    logits = model(tokens, pos)  # [1, s, V/tp]: vocab-parallel
    last = gather_from_tp(logits[:, -1, :].contiguous())
    last[..., vocab_size:] = float("-inf")  # padded vocabulary entries are never real tokens
    return last


def greedy(model, tokenizer, prompt: str, max_new: int, seq_length: int) -> str:
    ids = tokenizer.tokenize(prompt)
    out = []
    for _ in range(max_new):
        ctx = torch.tensor([(ids + out)[-seq_length:]], dtype=torch.long)
        nxt = int(next_token_logits(model, ctx, tokenizer.vocab_size).argmax(-1))
        if nxt == tokenizer.eod:
            break
        out.append(nxt)
    return tokenizer.detokenize(out)


@torch.no_grad()
def evaluate(model, cfg: Config, prefix: str, eval_iters: int, eod: int) -> float:
    from megatron_lite.data.builder import build_train_valid_test_datasets
    from megatron_lite.model.masks import get_ltor_masks_and_position_ids
    bs = cfg.train.micro_batch_size
    _, valid, _ = build_train_valid_test_datasets(
        [prefix], cfg.data.split, cfg.model.seq_length, cfg.train.seed, (0, eval_iters * bs, 0),
        cache_path=cfg.data.data_cache_path)
    if valid is None:
        raise ValueError(f"--eval-data-path {prefix}: the validation split ({cfg.data.split}) is empty")
    total, count = 0.0, 0
    for it in range(eval_iters):
        batch = torch.stack([torch.from_numpy(valid[it * bs + j]["text"]) for j in range(bs)]).long()
        tokens, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        mask, loss_mask, pos = get_ltor_masks_and_position_ids(
            tokens, eod, cfg.model.reset_position_ids, cfg.model.reset_attention_mask, cfg.model.eod_mask_loss)
        losses = model(tokens, pos, mask, labels=labels)
        total += float((losses.float() * loss_mask).sum())
        count += int(loss_mask.sum())
    return total / max(count, 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = saved_config(args.load)
        m, par = cfg.model, cfg.parallel
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if par.pipeline_model_parallel_size != 1 or world != par.tensor_model_parallel_size:
            raise ParallelConfigError(
                f"{args.load} was saved with TP={par.tensor_model_parallel_size} "
                f"PP={par.pipeline_model_parallel_size}; run this tool with PP=1 checkpoints and "
                f"--nproc_per_node {par.tensor_model_parallel_size} (got {world} processes)")
        tok = build_tokenizer(cfg.data.tokenizer_type, args.vocab_file or cfg.data.vocab_file,
                              args.merge_file or cfg.data.merge_file, cfg.data.tokenizer_model, m.vocab_size)
        m.hidden_dropout = m.attention_dropout = 0.0
        ps = initialize_parallel(par.tensor_model_parallel_size, 1, 1, backend="gloo")
        from megatron_lite.model.gpt import build_model_chunks
        from megatron_lite.parallel.random import model_parallel_seed
        model_parallel_seed(cfg.train.seed, ps)
        if m.padded_vocab_size is None:
            m.padded_vocab_size = pad_vocab_size(tok.vocab_size, m.make_vocab_size_divisible_by,
                                                 par.tensor_model_parallel_size)
        model = build_model_chunks(cfg, ps)[0]
        info = load_checkpoint(args.load, [model], pstate=ps, load_optim=False, load_rng=False)
        model.eval()
        say = print if ps.rank == 0 else (lambda *a, **k: None)
        say(f"loaded iteration {info['iteration']} from {args.load} (TP={ps.tp_size})")
        if args.eval_data_path:
            loss = evaluate(model, cfg, args.eval_data_path, args.eval_iters, tok.eod)
            say(f"validation: lm loss {loss:.4f} | PPL {math.exp(min(loss, 50)):.2f} "
                f"({args.eval_iters} batches of {cfg.train.micro_batch_size} x {m.seq_length} tokens)")
        for prompt in args.prompt or ["The"]:
            text = greedy(model, tok, prompt, args.max_new_tokens, m.seq_length)
            say(f"--- prompt: {prompt!r}\n{prompt}{text}")
    except (CheckpointError, TokenizerError, ParallelConfigError, ValueError, FileNotFoundError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
