"""``python -m forgetkit.run EXPERIMENT.yaml [key=value ...]``: the whole forgetting experiment.

Scores the base model, fully fine-tunes every arm for every seed, scores again, and writes
``results/<experiment>/`` (see forgetkit.results). Options::

    --arms naive,ewc     only these arms          --seeds 0,1    these seeds instead
    --dry-run            print the plan and the checks, run nothing
    --force              recompute finished runs (each old run is kept until its new one succeeded)
    --debug              full tracebacks

Before anything is evaluated, trained or deleted, every run is checked (data, model, tasks,
device, launcher), every finished run is compared with its requested config, and the results
directory's lock is tried. Exit status: 0 every run succeeded; 1 some failed (one line names
them); 2 bad input or a check failed; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from forgetkit.cli import debug_enabled, guarded, setup_logging
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
    ap.add_argument("--dry-run", action="store_true", help="print the plan and checks; run nothing")
    ap.add_argument("--force", action="store_true",
                    help="recompute finished runs (an old run is deleted only once its "
                         "replacement has succeeded)")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = ap.parse_intermixed_args(argv)  # options and overrides in any order

    from forgetkit import assets  # noqa: F401  (registers model and dataset aliases)
    from forgetkit.runner import check_plan, describe_plan, plan_runs, run_experiment, show_plan

    raw = read_yaml(args.config)
    over = parse_overrides(args.overrides)
    apply_overrides(raw, over)
    src = args.config + (" (with command-line overrides)" if over else "")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    seeds = _int_list(args.seeds) if args.seeds else None
    base, runs = plan_runs(raw, src, arms, seeds)  # every arm validated before anything runs
    checks = check_plan(base, runs, force=args.force)  # inputs, finished runs, the lock
    if show_plan(describe_plan(base, runs), checks, src, args.dry_run):
        return 0
    setup_logging(debug_enabled(argv))
    outcome = run_experiment(base, runs, force=args.force, src=src, checks=checks)
    table = "sequence_summary.csv" if base.sequence is not None else "summary.csv"
    print(f"results: {outcome.root}/{table}", file=sys.stderr)
    print(f"forgetkit: {outcome.message()}", file=sys.stderr)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
