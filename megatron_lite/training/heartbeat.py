"""Who stopped answering: each rank's iteration and phase, published to the process group's store.

Collectives are bounded by --distributed-timeout-minutes (gloo and NCCL time out), so a rank that
stalls (stuck in Python before a collective, a hung device) makes every rank waiting on it raise.
That error only says "timed out". Each rank therefore keeps ``megatron_lite/heartbeat/{rank}`` =
"iteration:phase" in the store; a rank that times out marks itself in ``megatron_lite/timed_out/``,
waits a moment for the others to do the same, and names the ranks that did not: those are the ones
that stopped answering (the rank that failed first, or the stalled one).
"""
from __future__ import annotations

import contextlib
import time
from typing import List, Optional

import torch.distributed as dist

PREFIX = "megatron_lite"
SETTLE_S = 3.0  # how long a timed-out rank waits for the other waiting ranks to say so too


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()  # noqa: SLF001 - torch has no public accessor
    except Exception:  # noqa: BLE001 - no store: nothing to publish to
        return None


class Heartbeat:
    def __init__(self, pstate, timeout_minutes: float):
        self.rank, self.world = pstate.rank, pstate.world_size
        self.timeout_minutes = timeout_minutes
        self.store = _default_store() if self.world > 1 and dist.is_initialized() else None
        self.iteration, self.phase_name = 0, "setup"

    def _publish(self) -> None:
        if self.store is not None:
            self.store.set(f"{PREFIX}/heartbeat/{self.rank}", f"{self.iteration}:{self.phase_name}")

    def beat(self, iteration: int) -> None:
        self.iteration = iteration
        self._publish()

    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self.phase_name = self.phase_name, name
        self._publish()
        yield  # on an exception the phase stays: the stall report names where this rank failed
        self.phase_name = previous

    def _read(self, key: str) -> Optional[str]:
        try:
            return self.store.get(key).decode() if self.store.check([key]) else None
        except Exception:  # noqa: BLE001 - the store's host may be gone too
            return None

    def describe_stall(self) -> str:
        """One line: what this rank was doing when it timed out, and which ranks stopped answering."""
        where = f"in the {self.phase_name} of iteration {self.iteration}"
        head = f"timed out after {self.timeout_minutes:g} min (--distributed-timeout-minutes) {where}"
        if self.store is None:
            return head + "; another rank stopped answering"
        try:
            self.store.set(f"{PREFIX}/timed_out/{self.rank}", "1")
        except Exception:  # noqa: BLE001
            return head + "; another rank stopped answering (the rendezvous store is gone too)"
        time.sleep(SETTLE_S)
        silent: List[str] = []
        for r in range(self.world):
            if r != self.rank and self._read(f"{PREFIX}/timed_out/{r}") is None:
                beat = self._read(f"{PREFIX}/heartbeat/{r}")
                seen = f"last seen at iteration {beat.replace(':', ', ', 1)}" if beat else "never seen"
                silent.append(f"rank {r} ({seen})")
        if not silent:
            return head + "; every rank timed out: a collective was never matched"
        return head + f"; stopped answering: {'; '.join(silent)}"
