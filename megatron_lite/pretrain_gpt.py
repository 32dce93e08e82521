"""Pretrain a GPT: ``torchrun --nproc_per_node N -m megatron_lite.pretrain_gpt <Megatron flags>``.

``python -m megatron_lite.pretrain_gpt ...`` runs the same code as one process. How failures are
reported (stderr, no traceback for anything the user can fix):

- a bad flag or flag combination (``ConfigError`` from ``validate``, which every rank runs the same
  way before any process group exists): rank 0 prints ``error: ...`` once; every rank exits 2;
- a user error found later on some ranks only (a missing checkpoint shard, an unreadable tokenizer
  file, an unwritable output path): each failing rank prints ``error: [rank N] ...``; exit 2;
- a rank that fails only because another rank died or a collective timed out prints at most
  ``error: [rank N] lost contact with another rank (its own error is printed above)``; exit 1;
- anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
import time
from typing import List, Optional

EXIT_USAGE = 2
EXIT_PEER_LOST = 1
# torchrun stops every worker at the first one that exits: ranks that fail identically to rank 0
# wait this long so that rank 0 has printed the shared message before torchrun stops it.
RANK0_FIRST_DELAY_S = 2.0
# What gloo (and our P2P layer) say when a peer process is gone or a transfer timed out.
PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                     "Timed out waiting", "remote worker crashing")


def _user_error_types():
    """Errors that mean "fix the command line or the files", not a bug."""
    from megatron_lite.data.gpt_dataset import GPTDatasetError
    from megatron_lite.data.indexed_dataset import IndexedDatasetError
    from megatron_lite.data.tokenizer import TokenizerError
    from megatron_lite.parallel.schedule_orders import ScheduleError
    from megatron_lite.parallel.state import ParallelConfigError
    from megatron_lite.training.batch import DataExhaustedError
    from megatron_lite.training.checkpoint import CheckpointError
    from megatron_lite.training.metrics import OutputPathError
    return (TokenizerError, GPTDatasetError, IndexedDatasetError, CheckpointError, ScheduleError,
            ParallelConfigError, DataExhaustedError, OutputPathError)


def is_peer_lost(e: BaseException) -> bool:
    """True when ``e`` only reports that another rank is gone or did not answer in time."""
    import torch.distributed as dist
    from megatron_lite.parallel.p2p import P2PError

    if isinstance(e, dist.DistError):  # DistBackendError, DistNetworkError, DistStoreError
        return True
    if isinstance(e, P2PError):
        # Our P2P layer wraps a failed transfer (raised from the backend's error); a P2PError
        # without a cause is a wrong activation shape on this rank, which is a bug.
        return e.__cause__ is not None
    if isinstance(e, (RuntimeError, ConnectionError)):
        return any(marker in str(e) for marker in PEER_LOST_MARKERS)
    return False


def is_user_os_error(e: BaseException) -> bool:
    """An OSError about a named file or directory (permission, missing, disk full), not a socket."""
    return isinstance(e, OSError) and not isinstance(e, ConnectionError) and e.filename is not None


def first_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _say(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


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


def _lost_contact_message(e: BaseException) -> str:
    if "Timed out" in str(e) or "timed out" in str(e):
        return ("timed out waiting for another rank (--distributed-timeout-minutes); that rank failed "
                "(its own error is printed above) or is stuck")
    return "lost contact with another rank (its own error is printed above)"


def main(argv: Optional[List[str]] = None) -> int:
    import torch.distributed as dist
    from megatron_lite.config import ConfigError, parse_args
    from megatron_lite.parallel.state import destroy_parallel
    from megatron_lite.training.trainer import pretrain

    cfg = parse_args(argv)  # argparse reports unknown flags itself (exit 2, usage line)
    rank = int(os.environ.get("RANK", "0"))
    multi_rank = int(os.environ.get("WORLD_SIZE", "1")) > 1
    who = f"[rank {rank}] " if multi_rank else ""
    failed = True
    try:
        if cfg.train.dry_run:
            status = dry_run(cfg)
        else:
            pretrain(cfg)
            status = 0
        failed = False
        return status
    except ConfigError as e:
        if dist.is_initialized():  # found after the groups exist: maybe on this rank only
            _say(who + first_line(e))
        elif rank == 0:  # validate() fails the same way on every rank: say it once
            _say(first_line(e))
        else:
            time.sleep(RANK0_FIRST_DELAY_S)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - sorted here; bugs are re-raised with their traceback
        if multi_rank and is_peer_lost(e):
            _say(who + _lost_contact_message(e))
            return EXIT_PEER_LOST
        if isinstance(e, _user_error_types()) or is_user_os_error(e):
            _say(who + first_line(e))
            return EXIT_USAGE
        raise
    finally:
        try:
            destroy_parallel()
        except Exception:  # noqa: BLE001 - a dead peer can make teardown fail too; the error is reported
            if not failed:
                raise


if __name__ == "__main__":
    sys.exit(main())
