"""``python -m forgetkit.run EXPERIMENT.yaml [key=value ...]``: the whole forgetting experiment.

Scores the base model, fully fine-tunes every arm for every seed, scores again, and writes
``results/<experiment>/`` (see forgetkit.results). Options::

    --arms naive,ewc     only these arms          --seeds 0,1    these seeds instead
    --dry-run            print the plan and exit  --force        recompute finished runs
"""

from __future__ import annotations

import argparse
import sys

from forgetkit.cli import guarded, setup_logging
from forgetkit.config import ConfigError, apply_overrides, parse_overrides, read_yaml


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {text!r}") from None


@guarded
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m forgetkit.run",
                                 description="Run a forgetting experiment (before/train/after).")
    ap.add_argument("config", help="experiment YAML")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides (all arms)")
    ap.add_argument("--arms", help="comma-separated arm names to run")
    ap.add_argument("--seeds", help="comma-separated seeds (replaces experiment.seeds)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    ap.add_argument("--force", action="store_true", help="recompute finished runs")
    args = ap.parse_intermixed_args(argv)  # options and overrides in any order

    from forgetkit import assets  # noqa: F401  (registers model and dataset aliases)
    from forgetkit.runner import describe_plan, plan_runs, run_experiment

    raw = read_yaml(args.config)
    over = parse_overrides(args.overrides)
    apply_overrides(raw, over)
    src = args.config + (" (with command-line overrides)" if over else "")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    seeds = _int_list(args.seeds) if args.seeds else None
    base, runs = plan_runs(raw, src, arms, seeds)  # every arm validated before anything runs
    print(describe_plan(base, runs), file=sys.stderr)
    if args.dry_run:
        return 0
    setup_logging()
    root = run_experiment(base, runs, force=args.force)
    print(f"results: {root}/summary.csv", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
