"""``python -m forgetkit.train CONFIG [key=value ...]``: the bare training stage."""

from __future__ import annotations

import argparse
import sys

from forgetkit.cli import guarded, setup_logging
from forgetkit.config import load_config


@guarded
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m forgetkit.train", description=__doc__)
    ap.add_argument("config", help="YAML config file")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = ap.parse_intermixed_args(argv)  # options and overrides in any order
    cfg = load_config(args.config, args.overrides)  # validated before anything is written
    setup_logging()
    from forgetkit import assets  # noqa: F401  (registers model and dataset aliases)
    from forgetkit.regularizers.build import build_regularizers
    from forgetkit.train.loop import train

    regs, replay, ratio = build_regularizers(cfg)
    train(cfg, regs, replay=replay, replay_ratio=ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
