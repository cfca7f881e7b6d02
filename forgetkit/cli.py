"""Shared helpers of the command-line faces: logging set-up, user errors and exit statuses.

Exit statuses (every face): 0 success; 1 a fault or failed work (disk full, a missing file
while running, a non-finite loss, failed runs); 2 bad input (ConfigError and its subclasses:
a config, a data file, a held lock); 130 Ctrl-C. A user error or an environmental fault is one
line on stderr, never a traceback; ``--debug`` (or ``FORGETKIT_DEBUG=1``, which it sets for
child processes) adds the full traceback. A bug (any other exception) keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable

from forgetkit.config import ConfigError

RESUME_HINT = "rerun the same command to resume"


def debug_enabled(argv: list[str] | None = None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("FORGETKIT_DEBUG", "") not in ("", "0")


def setup_logging(debug: bool = False) -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s forgetkit %(levelname)s: %(message)s" if rank == 0
        else f"%(asctime)s forgetkit[rank {rank}] %(levelname)s: %(message)s",
        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if debug:  # forgetkit's own debug lines (a failed run's traceback), not every library's
        logging.getLogger("forgetkit").setLevel(logging.DEBUG)


def _fault_types() -> tuple[type[BaseException], ...]:
    """Faults of the environment or the numbers, not of forgetkit's code: one line, exit 1.
    (OSError covers a missing file, a full disk and the loop's DiskFull.)"""
    types: list[type[BaseException]] = [OSError]
    loop = sys.modules.get("forgetkit.train.loop")  # only if the failed command imported it
    if loop is not None:
        types.append(loop.NonFiniteLoss)
    runner = sys.modules.get("forgetkit.runner")
    if runner is not None:
        types.append(runner.TrainingFailed)
    return tuple(types)


def fault_line(e: BaseException) -> str:
    """``<Type>: <message>`` on one line; an ENOSPC OSError is named as a full disk."""
    from forgetkit.results import disk_full_line, is_disk_full

    msg = " ".join(str(e).split())
    if is_disk_full(e):
        return disk_full_line(e)  # type: ignore[arg-type]
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def guarded(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn user errors and faults into one line on stderr and an exit status (module doc)."""

    def wrapper(argv: list[str] | None = None) -> int:
        debug = debug_enabled(argv)
        saved = os.environ.get("FORGETKIT_DEBUG")
        if debug:
            os.environ["FORGETKIT_DEBUG"] = "1"  # training subprocesses inherit it
        try:
            return _run(main, argv, debug)
        finally:  # a face called in-process leaves the environment as it found it
            if saved is None:
                os.environ.pop("FORGETKIT_DEBUG", None)
            else:
                os.environ["FORGETKIT_DEBUG"] = saved

    wrapper.__doc__ = main.__doc__
    wrapper.__wrapped__ = main  # type: ignore[attr-defined]
    return wrapper


def _run(main: Callable[[list[str] | None], int], argv: list[str] | None, debug: bool) -> int:
    """``main(argv)``, with user errors and faults turned into one line and an exit status."""
    try:
        return main(argv)
    except ConfigError as e:
        if debug:
            traceback.print_exc()
        kind = "config error: " if type(e) is ConfigError else ""
        print(f"forgetkit: {kind}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        msg = str(e) or f"interrupted; {RESUME_HINT}"
        print(f"forgetkit: {msg}", file=sys.stderr)
        return 130
    except Exception as e:
        if not isinstance(e, _fault_types()):
            raise  # a bug: the traceback is what its report needs
        if debug:
            traceback.print_exc()
        print(f"forgetkit: {fault_line(e)}", file=sys.stderr)
        return 1
