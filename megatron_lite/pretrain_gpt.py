"""Pretrain a GPT: ``torchrun --nproc_per_node N -m megatron_lite.pretrain_gpt <Megatron flags>``.

``python -m megatron_lite.pretrain_gpt ...`` runs the same code as one process. A bad flag, a
missing file or an unusable layout ends every rank with exit status 2; rank 0 prints one line
``error: ...`` on stderr (no traceback).
"""
from __future__ import annotations

import os
import sys
import time
from typing import List, Optional

EXIT_USAGE = 2
RANK0_FIRST_DELAY_S = 2.0


def _user_error_types():
    """Errors that mean "fix the command line or the files", not a bug."""
    from megatron_lite.config import ConfigError
    from megatron_lite.data.gpt_dataset import GPTDatasetError
    from megatron_lite.data.indexed_dataset import IndexedDatasetError
    from megatron_lite.data.tokenizer import TokenizerError
    from megatron_lite.parallel.schedule_orders import ScheduleError
    from megatron_lite.parallel.state import ParallelConfigError
    from megatron_lite.training.batch import DataExhaustedError
    from megatron_lite.training.checkpoint import CheckpointError
    return (ConfigError, TokenizerError, GPTDatasetError, IndexedDatasetError, CheckpointError, ScheduleError,
            ParallelConfigError, DataExhaustedError, FileNotFoundError)


def dry_run(cfg) -> int:
    """Validate the flags at this world size (WORLD_SIZE, default 1) and print the layout; no training."""
    from megatron_lite.config import validate
    from megatron_lite.model.flops import count_parameters
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if m.vocab_size is None:
        m.vocab_size = 50257  # GPT-2's, for the parameter count only: the tokenizer is not read here
    params = count_parameters(m)
    print(f"dry run: flags valid for world size {world}: TP={p.tensor_model_parallel_size} "
          f"PP={p.pipeline_model_parallel_size} DP={p.data_parallel_size} schedule={p.pipeline_schedule}; "
          f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, seq {m.seq_length} "
          f"(~{params / 1e9:.2f}B parameters); micro-batch {t.micro_batch_size}, global batch "
          f"{t.global_batch_size}, {t.train_iters} iterations")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_lite.config import parse_args
    from megatron_lite.parallel.state import destroy_parallel
    from megatron_lite.training.trainer import pretrain

    cfg = parse_args(argv)  # argparse reports unknown flags itself (exit 2, usage line)
    try:
        if cfg.train.dry_run:
            return dry_run(cfg)
        pretrain(cfg)
    except _user_error_types() as e:
        if int(os.environ.get("RANK", "0")) == 0:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: {message}", file=sys.stderr, flush=True)
        else:
            # torchrun stops every worker at the first failed one: let rank 0 fail (and print) first.
            time.sleep(RANK0_FIRST_DELAY_S)
        return EXIT_USAGE
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
