"""The one reporter: every entry point (``pretrain_gpt`` and each tool) runs its body through
``run_main``, which turns the errors a user can fix into one ``error: ...`` line and an exit status.

- a ``UserError`` (``megatron_lite.errors``) or an ``OSError`` about a named file: one line; exit
  ``usage_status`` (2 for the trainer, as argparse; 1 for the data tools, as before);
- Ctrl-C: the tool's interrupted message; exit 130;
- with several ranks (``WORLD_SIZE`` > 1): a ``ConfigError`` found before the process groups exist
  (a bad flag; every rank runs the same checks) is printed once, by rank 0; any other user error
  may be on some ranks only, so each failing rank prints it behind ``[rank N]``; a rank that fails only because
  another rank died or a collective timed out prints one "lost contact" line and exits 1;
- anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

from megatron_lite.errors import ConfigError, RankStalledError, UserError

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_PEER_LOST = 1
INTERRUPTED_EXIT_STATUS = 130  # 128 + SIGINT, as a shell reports it
# torchrun stops every worker at the first one that exits: ranks that fail identically to rank 0
# wait this long so that rank 0 has printed the shared message before torchrun stops it.
RANK0_FIRST_DELAY_S = 2.0
STALL_REPORT_GRACE_S = 3.0
STALL_REPORT_GRACE_MAX_S = 15.0
# What gloo (and our P2P layer) say when a peer process is gone or a transfer timed out.
PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                     "Timed out waiting", "remote worker crashing")


def format_os_error(e: OSError) -> str:
    """'path: reason' for a failed file operation (str(e) repeats the errno and quotes the path)."""
    if isinstance(e, IsADirectoryError) and e.filename:
        return f"{e.filename}: is a directory; give a file path"
    return f"{e.filename or ''}: {e.strerror or e}"


def first_line(e: BaseException) -> str:
    """The message of ``e`` as one line."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return format_os_error(e)
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def say_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def is_user_error(e: BaseException) -> bool:
    """A UserError, or an OSError about a named file or directory (permission, missing, disk full)."""
    if isinstance(e, UserError):
        return True
    return isinstance(e, OSError) and not isinstance(e, ConnectionError) and e.filename is not None


def is_peer_lost(e: BaseException) -> bool:
    """True when ``e`` only reports that another rank is gone or did not answer in time."""
    if "torch" not in sys.modules:  # no collective can have failed without torch
        return False
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


def _groups_exist() -> bool:
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def _lost_contact_message(e: BaseException) -> str:
    if "timed out" in str(e).lower():
        return ("timed out waiting for another rank (--distributed-timeout-minutes); that rank failed "
                "(its own error is printed above) or is stuck")
    return "lost contact with another rank (its own error is printed above)"


def report(e: BaseException, *, usage_status: int = EXIT_FAILURE,
           interrupted_message: str = "interrupted: no output written") -> int:
    """Print ``e`` (a user error or Ctrl-C) as the rules above say; return the exit status.
    Re-raises anything that is a bug."""
    if isinstance(e, KeyboardInterrupt):
        print(interrupted_message, file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_STATUS
    rank = int(os.environ.get("RANK", "0"))
    multi_rank = int(os.environ.get("WORLD_SIZE", "1")) > 1
    who = f"[rank {rank}] " if multi_rank else ""
    if isinstance(e, RankStalledError):
        say_error(who + first_line(e))
        if multi_rank:
            # The ranks waiting on the stalled one (directly, or on a rank that waits on it) time out
            # at most one collective timeout apart; torchrun stops the group at the first exit, so each
            # lingers that long (capped) to let the others say theirs.
            time.sleep(min(max(e.timeout_s, STALL_REPORT_GRACE_S), STALL_REPORT_GRACE_MAX_S))
        return EXIT_PEER_LOST
    if multi_rank and is_peer_lost(e):
        say_error(who + _lost_contact_message(e))
        return EXIT_PEER_LOST
    if not is_user_error(e):
        raise e
    if multi_rank and isinstance(e, ConfigError) and not _groups_exist():
        # A flag error found before any process group: every rank ran the same checks, so say it once.
        if rank == 0:
            say_error(first_line(e))
        else:
            time.sleep(RANK0_FIRST_DELAY_S)
    else:
        say_error(who + first_line(e))
    return usage_status


def run_main(body: Callable[[], int], *, usage_status: int = EXIT_FAILURE,
             interrupted_message: str = "interrupted: no output written") -> int:
    """``body()``'s exit status, or the reported error's."""
    try:
        return body()
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - report() re-raises bugs
        return report(e, usage_status=usage_status, interrupted_message=interrupted_message)


def run_distributed_main(body: Callable[[], int], *, usage_status: int = EXIT_USAGE) -> int:
    """``run_main`` for an entry point that may start process groups (the trainer, the inference
    tools): they are torn down afterwards. A teardown that fails after an error already reported
    (a dead peer) stays quiet; after a success it is a bug and raises."""
    failed = True
    try:
        status = run_main(body, usage_status=usage_status)
        failed = status != 0
        return status
    finally:
        if "torch" in sys.modules:  # nothing to tear down in a tool that failed before importing torch
            from megatron_lite.parallel.state import destroy_parallel
            try:
                destroy_parallel()
            except Exception:  # noqa: BLE001
                if not failed:
                    raise
