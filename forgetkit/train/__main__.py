"""``python -m forgetkit.train CONFIG [key=value ...]``: the bare training stage.

Every input is checked first (preflight: data, model, device), in seconds, before anything is
written; ``--dry-run`` shows the checks and stops. Exit status: 0 trained; 1 a fault while
training (non-finite loss, disk full, ...: one line; the traceback goes to ``run.log`` in the
output directory, and to stderr under ``--debug``); 2 bad input; 130 interrupted (rerunning the
same command resumes from the last checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from forgetkit.cli import debug_enabled, guarded, setup_logging
from forgetkit.config import Config, ConfigError, load_config
from forgetkit.results import RUN_LOG


def _log_traceback(cfg: Config, e: BaseException) -> None:
    """The full traceback of a failed training, appended to ``<output dir>/run.log``."""
    try:
        out = cfg.output_dir()
        if out.is_dir():
            with (out / RUN_LOG).open("a") as fh:
                fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} forgetkit.train failed:\n"
                         + "".join(traceback.format_exception(e)) + "\n")
    except OSError:
        pass  # the disk may be full; the one-line error still reaches stderr


@guarded
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m forgetkit.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config file")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    ap.add_argument("--dry-run", action="store_true", help="print the checks; train nothing")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = ap.parse_intermixed_args(argv)  # options and overrides in any order
    cfg = load_config(args.config, args.overrides)  # validated before anything is written
    src = args.config + (" (with command-line overrides)" if args.overrides else "")
    if cfg.sequence is not None:
        raise ConfigError(f"{src}: sequence: a task sequence is run by python -m forgetkit.run "
                          "(one training per stage, each from the previous stage's model); "
                          "python -m forgetkit.train trains one config")
    from forgetkit import assets  # noqa: F401  (registers model and dataset aliases)
    from forgetkit.preflight import preflight, raise_on_problems

    checks = preflight(cfg, launcher=[], evaluation=False)
    if args.dry_run:
        print("checks:\n" + "\n".join(f"  {'✓' if c.ok else '✗'} "
                                      f"{c.what if c.ok else c.problem or c.what}"
                                      for c in checks), file=sys.stderr)
    raise_on_problems(checks, src)
    if args.dry_run:
        return 0
    setup_logging(debug_enabled(argv))
    from forgetkit.regularizers.build import check_regularizers
    from forgetkit.train.loop import train

    try:
        check_regularizers(cfg)
        train(cfg)
    except ConfigError:
        raise  # bad input: its one line says everything
    except Exception as e:
        if os.environ.get("RANK", "0") == "0":
            _log_traceback(cfg, e)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
