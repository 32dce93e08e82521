"""The command-line flags of ``megatron_lite.pretrain_gpt``, spelled as in Megatron-LM.

Every flag's argparse dest is the name of a field of one of the dataclasses in
``megatron_lite.config`` (which re-exports ``build_parser`` and turns the namespace into a
``Config``); add a flag here and its field there together. Defaults match the fields' defaults.
"""
from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron_lite.pretrain_gpt",
                                description="Pretrain a GPT with tensor/pipeline/data parallelism.",
                                allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute")
    g.add_argument("--rotary-base", type=float, default=10000.0)
    g.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size when no tokenizer files are given (mock data, tests)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--layernorm-epsilon", type=float, default=1e-5)
    g.add_argument("--openai-gelu", action="store_true",
                   help="tanh-approximated GeLU, as OpenAI's GPT-2 (HF gelu_new); default the exact GeLU")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--attention-backend", choices=["auto", "unfused", "fused_softmax", "sdpa"], default="auto")
    g.add_argument("--no-masked-softmax-fusion", dest="masked_softmax_fusion", action="store_false")
    g.add_argument("--attention-softmax-in-fp32", action="store_true",
                   help="with --fp16/--bf16, compute the unfused attention softmax in fp32 (fp32 runs are "
                        "unaffected; the Triton kernel always computes in fp32)")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--eod-mask-loss", action="store_true")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    g.add_argument("--pipeline-schedule", choices=["gpipe", "1f1b", "interleaved"], default=None)
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None)
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0)
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="ZeRO-1: shard fp32 master weights and Adam moments over the data-parallel ranks")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce each gradient bucket as soon as backward fills it")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer: all-gather updated parameters during the next forward")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="elements per gradient bucket (default max(40M, 1M x DP) with --overlap-grad-reduce, "
                        "else one bucket per dtype)")

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer", choices=["adam"], default="adam")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="linear")
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--loss-scale", type=float, default=None)
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)

    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="PREFIX, or a weighted list: W1 PREFIX1 W2 PREFIX2 ...")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--tokenizer-type", default="GPT2BPETokenizer",
                   choices=["GPT2BPETokenizer", "HuggingFaceTokenizer", "NullTokenizer"])
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--mock-data", action="store_true", help="random tokens instead of --data-path")

    g = p.add_argument_group("training, logging, checkpoints")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="load the model weights of --load only: no optimizer or RNG state, iteration 0")
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--exit-duration-in-mins", type=float, default=None)
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM (e.g. Slurm preemption) every rank finishes the current iteration, the run "
                        "saves to --save and exits 0")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-jsonl", default=None, help="(megatron_lite) one JSON line per logged iteration")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="(megatron_lite) device peak TFLOP/s for MFU; default: the dense bf16/fp16 (or TF32) "
                        "peak of the CUDA device from training/metrics.py's table; on CPU, MFU needs it")
    g.add_argument("--log-num-zeros-in-grad", action="store_true")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="average the loss over the loss tokens of the whole global batch, not per micro-batch")
    g.add_argument("--dry-run", action="store_true",
                   help="(megatron_lite) validate the flags against WORLD_SIZE, print the config, exit")
    return p
