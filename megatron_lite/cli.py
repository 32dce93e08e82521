"""The one-line error report shared by the command-line tools (no traceback for expected errors)."""
from __future__ import annotations

import sys

INTERRUPTED_EXIT_STATUS = 130  # 128 + SIGINT, as a shell reports it


def format_os_error(e: OSError) -> str:
    """'path: reason' for a failed file operation (str(e) repeats the errno and quotes the path)."""
    return f"{e.filename or ''}: {e.strerror or e}"


def report_cli_error(e: BaseException, interrupted_message: str = "interrupted: no output written") -> int:
    """Print `e` as one line on stderr and return the tool's exit status (130 on Ctrl-C, else 1).

    Call it from an `except` clause listing the exceptions the tool expects; anything else still
    raises with its traceback, since that is a bug to see, not a user error.
    """
    if isinstance(e, KeyboardInterrupt):
        print(interrupted_message, file=sys.stderr)
        return INTERRUPTED_EXIT_STATUS
    message = format_os_error(e) if isinstance(e, OSError) else str(e)
    print(f"error: {message}", file=sys.stderr)
    return 1
