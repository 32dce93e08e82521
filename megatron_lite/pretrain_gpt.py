"""Pretrain a GPT: ``torchrun --nproc_per_node N -m megatron_lite.pretrain_gpt <Megatron flags>``.

The GPT pretraining task, as Megatron-LM's ``pretrain_gpt.py``: its three providers (model,
datasets, forward step with the masked-mean loss) handed to the generic trainer, plus the entry
point. ``python -m megatron_lite.pretrain_gpt ...`` runs the same code as one process. Errors are
reported by ``megatron_lite.cli`` (one ``error:`` line, exit 2; see there for the rules with
several ranks).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import List, Optional, Sequence

from megatron_lite.cli import run_distributed_main


def model_provider(cfg, pstate):
    """This rank's GPT chunks (one per virtual stage with interleaving)."""
    from megatron_lite.model.gpt import build_model_chunks

    return build_model_chunks(cfg, pstate)


def datasets_provider(cfg, tokenizer, train_valid_test_num_samples: Sequence[int]):
    """(train, valid, test): --mock-data, or --data-path / --split shards."""
    from megatron_lite.data.builder import build_pretraining_datasets

    return build_pretraining_datasets(cfg.data, cfg.model.seq_length, cfg.train.seed,
                                      train_valid_test_num_samples, vocab_size=cfg.model.vocab_size)


def loss_func(loss_mask, output_tensor, per_token_loss: bool = False):
    """Mean of the per-token losses over the tokens the mask keeps (Megatron's GPT loss); with
    ``per_token_loss`` (--calculate-per-token-loss) their sum and count, which the trainer
    normalises over the global batch (training/token_loss.py)."""
    import torch

    if per_token_loss:
        from megatron_lite.training.token_loss import token_sum_loss
        return token_sum_loss(output_tensor, loss_mask)
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses * mask) / mask.sum().clamp(min=1.0)
    return loss, {"lm loss": loss.detach()}


def forward_step(data_iterator, model, per_token_loss: bool = False):
    """One micro-batch through this stage; on the last stage the per-token loss, masked in loss_func."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    return output, functools.partial(loss_func, batch["loss_mask"], per_token_loss=per_token_loss)


def forward_step_for(cfg):
    """The forward step for ``cfg``'s loss normalisation."""
    if cfg.train.calculate_per_token_loss:
        return functools.partial(forward_step, per_token_loss=True)
    return forward_step


def pretrain_gpt(cfg, world_size: Optional[int] = None):
    """Run GPT pretraining for ``cfg``; returns the trainer's summary."""
    from megatron_lite.training.trainer import pretrain

    return pretrain(cfg, datasets_provider, model_provider, forward_step_for(cfg), world_size=world_size)


def dry_run(cfg) -> int:
    """Validate the flags at this world size (WORLD_SIZE, default 1) and print the layout; no training."""
    from megatron_lite.config import validate
    from megatron_lite.model.flops import count_parameters
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)
    m, p, t = cfg.model, cfg.parallel, cfg.train
    assumed = ""
    if m.vocab_size is None:
        m.vocab_size = 50257  # GPT-2's, for the parameter count only: the tokenizer is not read here
        assumed = " (vocabulary of 50257 assumed: pass --vocab-size for another tokenizer's)"
    params = count_parameters(m)
    print(f"dry run: flags valid for world size {world}: TP={p.tensor_model_parallel_size} "
          f"PP={p.pipeline_model_parallel_size} DP={p.data_parallel_size} schedule={p.pipeline_schedule}; "
          f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, seq {m.seq_length} "
          f"(~{params / 1e9:.2f}B parameters); micro-batch {t.micro_batch_size}, global batch "
          f"{t.global_batch_size}, {t.train_iters} iterations{assumed}")
    print_memory_estimate(cfg)
    return 0


def print_memory_estimate(cfg) -> None:
    """Per-rank memory (weights, gradients, optimizer, activations) and the bubble, against the GPU's memory."""
    import torch

    from megatron_lite.model.memory import estimate_memory, format_memory_estimate

    device_bytes = name = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device_bytes, name = props.total_memory, props.name
    for line in format_memory_estimate(estimate_memory(cfg, "cuda"), device_bytes, name):
        print(line)


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_lite.config import parse_args

    cfg = parse_args(argv)  # argparse reports unknown flags itself (exit 2, usage line)

    def body() -> int:
        if cfg.train.dry_run:
            return dry_run(cfg)
        pretrain_gpt(cfg)
        return 0

    return run_distributed_main(body)


if __name__ == "__main__":
    sys.exit(main())
