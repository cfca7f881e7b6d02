"""Shared helpers of the command-line faces: logging set-up and user-error handling."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from forgetkit.config import ConfigError


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s forgetkit %(levelname)s: %(message)s" if rank == 0
        else f"%(asctime)s forgetkit[rank {rank}] %(levelname)s: %(message)s",
        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def guarded(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Turn user errors (bad config, missing file) into one line on stderr and exit status 2."""

    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except ConfigError as e:
            print(f"forgetkit: config error: {e}", file=sys.stderr)
            return 2

    return wrapper
