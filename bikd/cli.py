"""What every entry script in ``jobs/`` shares: the command line (``--config``, ``--set``, ``--debug``), errors
as one line, a clean stop at Ctrl-C / SIGTERM, and torch's thread count.

A user's mistake (a bad value, a missing data folder) is one line on stderr and a non-zero exit; the
traceback is for ``--debug``. Config errors are found before any work and exit with 2 (argparse's code for
bad arguments), errors during the run with 1, an abort by a second Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Callable, TypeVar

import torch

from bikd.config import add_config_args, config_from_args

__all__ = ["job_parser", "parse_job_config", "run_main", "GracefulStop", "default_num_threads", "set_num_threads"]

T = TypeVar("T")


def job_parser(doc: str | None) -> argparse.ArgumentParser:
    parser = add_config_args(argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    return parser


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    # a ValueError / OSError from bikd already says what was wrong; anything else also says what kind it was
    return text if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: {text}"


def parse_job_config(parser: argparse.ArgumentParser, cls: type[T],
                     check: Callable[[T], T] | None = None) -> tuple[argparse.Namespace, T]:
    """Arguments and the validated config; a bad config exits with argparse's one-line error (code 2)
    before anything starts. ``check`` runs further validation (files, cluster) and may return a new config."""
    args = parser.parse_args()
    try:
        cfg = config_from_args(cls, args)
        if check is not None:
            cfg = check(cfg)
    except (ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        parser.error(_one_line(e))
    return args, cfg


def run_main(main: Callable[[], int | None], debug: bool) -> None:
    """Runs ``main`` and exits: an error is printed as one line (the traceback with ``debug``)."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("aborted (a second Ctrl-C): the last checkpoint written is kept", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the whole point: one line instead of a traceback
        if debug:
            raise
        print(f"error: {_one_line(e)}\n(run again with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)


class GracefulStop:
    """While active, the first SIGINT or SIGTERM only sets ``requested``: the training loop finishes (or
    drops) its step, writes a checkpoint and returns. A second SIGINT raises KeyboardInterrupt (abort).

    Install it after ``ray.init``: Ray's driver sets a SIGTERM handler of its own that exits at once."""

    def __init__(self, what: str = "the current step"):
        self.what = what
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __bool__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        name = signal.Signals(signum).name
        print(f"\n{name}: stopping after {self.what} and writing a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def default_num_threads() -> int:
    """The CPUs this process may run on (its affinity mask: ``taskset``, a container's cpuset, a Ray
    worker's assignment), not the machine's: torch's default, one thread per machine core, collapses when
    other processes share those cores."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def set_num_threads(num_threads: int | None) -> int:
    """Sets torch's intra-op thread count (``None``: :func:`default_num_threads`) and returns it."""
    n = num_threads or default_num_threads()
    torch.set_num_threads(n)
    return n
