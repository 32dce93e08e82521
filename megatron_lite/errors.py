"""The errors that mean "fix your command line or your files", as opposed to a bug.

Every such error derives from ``UserError``; ``megatron_lite.cli`` is the one place that turns
them into an ``error: ...`` line and an exit status, for ``pretrain_gpt`` and every tool.
Anything that is not a ``UserError`` (nor an ``OSError`` about a named file) is a bug and keeps
its traceback. Each subclass keeps the builtin base it had before (``ValueError`` or
``RuntimeError``) so that callers catching those still work. Messages are one line that names
the flag, file or line at fault and says what to do.

torch-free: data tools import this without torch.
"""
from __future__ import annotations


class UserError(Exception):
    """Base of every error the user can fix: a flag, a file, a line of input."""


class ConfigError(UserError, ValueError):
    """A bad flag or flag combination. The message names the flags and the fix."""


class ParallelConfigError(UserError, ValueError):
    """A parallel layout that cannot be built (world size, devices, rendezvous)."""


class TokenizerError(UserError, ValueError):
    """A missing, unreadable or inconsistent tokenizer file, or text the tokenizer cannot encode."""


class IndexedDatasetError(UserError, ValueError):
    """A missing, truncated or inconsistent .bin/.idx shard."""


class DatasetError(UserError, ValueError):
    """A dataset that cannot serve the run: bad split, empty corpus, bad sample-index cache."""


class DataExhaustedError(UserError, RuntimeError):
    """The dataset has fewer samples than the schedule asks for."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable, of another layout or of another model."""


class ScheduleError(UserError, ValueError):
    """A pipeline schedule asked to run with numbers it cannot run (micro-batches, chunks)."""


class OutputPathError(UserError, RuntimeError):
    """An output location that cannot be written."""


class InputError(UserError, ValueError):
    """A tool's input file that is missing, unreadable or malformed."""


class RankStalledError(UserError):
    """A collective timed out because another rank stopped answering (the message names it).
    ``timeout_s``: the collective timeout, which bounds how far apart the waiting ranks time out."""

    def __init__(self, message: str, timeout_s: float = 0.0):
        super().__init__(message)
        self.timeout_s = timeout_s
