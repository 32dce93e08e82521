"""Move a checkpoint to another TP x PP x VP layout, or to / from HuggingFace GPT-2.

    # any layout -> any layout (weights only by default; --with-optim reshards Adam and fp32 masters)
    python tools/checkpoint_convert.py --load-dir ckpt --save-dir ckpt_tp1 \\
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1
    # -> HuggingFace: config.json + model.safetensors (+ tokenizer files) for GPT2LMHeadModel
    python tools/checkpoint_convert.py --load-dir ckpt --target huggingface --save-dir hf_gpt2
    # HuggingFace GPT-2 directory -> megatron_lite at TP=2 (ready for --load or --finetune)
    python tools/checkpoint_convert.py --source huggingface --load-dir hf_gpt2 --save-dir ckpt_tp2 \\
        --target-tensor-parallel-size 2

The output directory must not exist (or be empty): it is written under a temporary name and renamed
when complete, so an existing checkpoint is never modified and an interrupted run leaves nothing
that looks like one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch

from megatron_lite.cli import EXIT_USAGE, run_main
from megatron_lite.errors import CheckpointError, InputError
from megatron_lite.io_utils import atomic_write_text


@contextmanager
def new_output_dir(path: str) -> Iterator[str]:
    """Yield ``path + '.converting'`` to write into; renamed to ``path`` when the block succeeds,
    removed when it fails. ``path`` must not exist (or be empty)."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise InputError(f"--save-dir {path}: exists and is not empty; converted checkpoints are written to a new "
                         "directory (an existing one is never modified)")
    staging = path.rstrip("/") + ".converting"
    if os.path.isdir(staging):
        shutil.rmtree(staging)  # left by an interrupted conversion
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(path):
        os.rmdir(path)  # empty, checked above
    os.rename(staging, path)


def to_layout(args) -> None:
    from megatron_lite.training.checkpoint_convert import Source, convert

    src = Source.open(args.load_dir)
    with new_output_dir(args.save_dir) as staging:
        convert(src, staging, args.target_tensor_parallel_size, args.target_pipeline_parallel_size,
                args.target_num_layers_per_virtual_pipeline_stage, with_optim=args.with_optim)
    print(f"converted {args.load_dir} (TP={src.tp} PP={src.pp}) at iteration {src.iteration} to "
          f"TP={args.target_tensor_parallel_size} PP={args.target_pipeline_parallel_size}"
          f"{' with optimizer state' if args.with_optim else ' (weights only; --with-optim keeps the optimizer)'}: "
          f"{args.save_dir}")


def to_huggingface(args) -> None:
    from safetensors.torch import save_file

    from megatron_lite.training.checkpoint_convert import Source
    from megatron_lite.training.hf_gpt2 import check_exportable, hf_config, to_hf

    src = Source.open(args.load_dir)
    model = src.args["model"]
    check_exportable(model)
    with new_output_dir(args.save_dir) as staging:
        tensors = {name: t.contiguous() for name, t in to_hf(lambda n: src.full(n, unpad=True), model)}
        save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        atomic_write_text(os.path.join(staging, "config.json"), json.dumps(hf_config(model), indent=1) + "\n")
        copied = _copy_tokenizer(src.args.get("data") or {}, staging)
    print(f"exported {args.load_dir} (iteration {src.iteration}) as GPT2LMHeadModel to {args.save_dir}: "
          f"{len(tensors)} tensors in model.safetensors, config.json"
          + (f", {', '.join(copied)}" if copied else "; no tokenizer files recorded in the checkpoint (mock data?)"))


def _copy_tokenizer(data: dict, out: str) -> List[str]:
    copied = []
    for key, name in (("vocab_file", "vocab.json"), ("merge_file", "merges.txt"), ("tokenizer_model", "tokenizer.json")):
        path = data.get(key)
        if path and os.path.isfile(path):
            shutil.copyfile(path, os.path.join(out, name))
            copied.append(name)
    return copied


def read_hf_dir(path: str):
    """(config.json as a dict, state dict) of a local GPT-2 directory; no pickle beyond weights_only."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise InputError(f"--load-dir {path}: no config.json; give a HuggingFace GPT-2 model directory")
    with open(cfg_path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"{cfg_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if cfg.get("model_type") != "gpt2":
        raise InputError(f"{cfg_path}: model_type {cfg.get('model_type')!r}; only GPT-2 (gpt2) is supported")
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        try:
            return cfg, load_file(st)
        except Exception:  # noqa: BLE001
            raise CheckpointError(f"{st}: not a readable safetensors file") from None
    if os.path.isfile(pt):
        try:
            return cfg, torch.load(pt, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001
            raise CheckpointError(f"{pt}: not loadable with weights_only=True (corrupt, or not plain tensors)") from None
    raise InputError(f"--load-dir {path}: neither model.safetensors nor pytorch_model.bin")


def from_huggingface(args) -> None:
    from megatron_lite.config import Config
    from megatron_lite.training.checkpoint_convert import TensorSource, convert
    from megatron_lite.training.hf_gpt2 import from_hf, model_config_from_hf

    hf_cfg, hf_state = read_hf_dir(args.load_dir)
    fields = model_config_from_hf(hf_cfg)
    cfg = Config()
    for k, v in fields.items():
        setattr(cfg.model, k, v)
    cfg.model.hidden_dropout = float(hf_cfg.get("resid_pdrop", 0.1))
    cfg.model.attention_dropout = float(hf_cfg.get("attn_pdrop", 0.1))
    cfg.model.bf16 = hf_state[next(iter(hf_state))].dtype == torch.bfloat16
    vocab, merges = os.path.join(args.load_dir, "vocab.json"), os.path.join(args.load_dir, "merges.txt")
    if os.path.isfile(vocab) and os.path.isfile(merges):
        cfg.data.vocab_file, cfg.data.merge_file = os.path.abspath(vocab), os.path.abspath(merges)
    tensors = from_hf(hf_state, fields)
    rows = tensors["embedding.word_embeddings.weight"].shape[0]
    if rows != fields["vocab_size"]:
        raise CheckpointError(f"{args.load_dir}: wte has {rows} rows, "
                              f"config.json says vocab_size {fields['vocab_size']}")
    with new_output_dir(args.save_dir) as staging:
        convert(TensorSource(cfg.to_dict(), tensors, root=args.load_dir), staging, args.target_tensor_parallel_size,
                args.target_pipeline_parallel_size, args.target_num_layers_per_virtual_pipeline_stage)
    print(f"imported {args.load_dir} ({fields['num_layers']} layers, hidden {fields['hidden_size']}, vocab "
          f"{fields['vocab_size']}) at TP={args.target_tensor_parallel_size} PP={args.target_pipeline_parallel_size}"
          f" to {args.save_dir}; train with the same model flags and --load {args.save_dir} (or --finetune)")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--load-dir", required=True, help="the checkpoint (or HuggingFace directory) to read")
    p.add_argument("--save-dir", required=True, help="a new directory to write")
    p.add_argument("--source", choices=["megatron", "huggingface"], default="megatron")
    p.add_argument("--target", choices=["megatron", "huggingface"], default="megatron")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    p.add_argument("--target-num-layers-per-virtual-pipeline-stage", type=int, default=None)
    p.add_argument("--with-optim", action="store_true",
                   help="also reshard the optimizer state (Adam moments, fp32 masters) and the lr schedule")
    p.add_argument("--no-optim", dest="with_optim", action="store_false", help="weights only (the default)")
    args = p.parse_args(argv)

    def body() -> int:
        if args.source == "huggingface" and args.target == "huggingface":
            raise InputError("--source huggingface and --target huggingface: one side must be megatron")
        if min(args.target_tensor_parallel_size, args.target_pipeline_parallel_size) < 1:
            raise InputError("--target-tensor-parallel-size and --target-pipeline-parallel-size must be >= 1")
        if args.target == "huggingface":
            if args.with_optim:
                raise InputError("--with-optim: a HuggingFace export holds the weights only")
            to_huggingface(args)
        elif args.source == "huggingface":
            if args.with_optim:
                raise InputError("--with-optim: a HuggingFace model has no optimizer state to import")
            from_huggingface(args)
        else:
            to_layout(args)
        return 0

    return run_main(body, usage_status=EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(main())
