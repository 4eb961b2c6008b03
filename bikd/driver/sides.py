"""The LM side of a run as the driver sees it: one Ray Train fit over every round, in a driver thread."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import ray

from bikd.ray.exchange import LMRound
from bikd.ray.lm_train import LMJobConfig, run as run_lm

__all__ = ["LMSide"]


class LMSide:
    """Starts the fit of ``job`` (a job in rounds, ``bikd.driver.lm_side``). Round k's result arrives through
    the exchange actor, posted by LM rank 0 once the round's export is complete and its checkpoint committed,
    so the driver never acts on a round that a restart could take back. One fit instead of one per round:
    the worker group, process group and DeepSpeed engine start once per run, not once per round."""

    def __init__(self, job: LMJobConfig, exchange):
        self.exchange = exchange
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="bikd-lm")
        self.fit = self.pool.submit(run_lm, job)

    def allow(self, rnd: int) -> None:
        """Round ``rnd`` may start (gated rounds, sync mode)."""
        ray.get(self.exchange.allow_lm_round.remote(rnd))

    def result(self, rnd: int, check: Callable[[], None] = lambda: None, poll_s: float = 0.2) -> LMRound:
        """Waits for round ``rnd``; ``check()`` runs while waiting (to surface another side's error)."""
        while (done := ray.get(self.exchange.lm_round.remote(rnd))) is None:
            if self.fit.done():
                self.fit.result()  # the fit's error, if it failed
                raise RuntimeError(f"the LM side ended without posting round {rnd}")
            check()
            time.sleep(poll_s)
        return done

    def finish(self) -> None:
        """Waits for the fit to end by itself (after its last round); raises its error."""
        self.fit.result()

    def close(self) -> None:
        """Asks the fit to stop (at its next poll or round end) and waits for it; its error, if any, is left
        to ``result``/``finish`` (the driver is already ending)."""
        try:
            ray.get(self.exchange.stop_lm.remote())
        finally:
            self.pool.shutdown(wait=True)
