"""Entry point of the distributed tests (not a test module itself).

    python tests/dist_worker.py CONFIG [key=value ...] [--save-init FILE]
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py CONFIG [...]

Trains exactly as ``python -m forgetkit.train`` does, then writes ``worker-rank{R}.json`` into
the run's output directory: which backend and which model wrapper actually ran, the world size and
the step it resumed from. With that a test can tell "FSDP matched the reference" apart from
"FSDP was silently not used". ``--save-init`` also writes the initial weights (rank 0), so a test
can check that training moved them by far more than its tolerances.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: sys.path[0] is tests/, not the repository
    sys.path.insert(0, str(REPO))


def describe(backend: Any) -> dict[str, Any]:
    """What actually ran: backend class, model wrapper, world size, ZeRO stage."""
    from torch.distributed.fsdp import FSDPModule

    from forgetkit.train.distributed import DeepSpeedBackend

    model = backend.model
    info: dict[str, Any] = {
        "backend": type(backend).__name__,
        "name": backend.name,
        "rank": backend.rank,
        "world_size": backend.world_size,
        "wrapper": type(model).__name__,
        "fsdp": isinstance(model, FSDPModule),
        "zero_stage": None,
    }
    if isinstance(backend, DeepSpeedBackend):
        info["zero_stage"] = int(model.zero_optimization_stage())
    return info


def save_init(cfg: Any, path: Path) -> None:
    """The weights every rank starts from (random init from the config's seed)."""
    from safetensors.torch import save_file

    from forgetkit.models import load_model

    model, _ = load_model(cfg.model, seed=cfg.seed)
    # clone: tied weights share storage, which safetensors refuses to save twice
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--save-init", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch.distributed as dist

    from forgetkit.cli import setup_logging
    from forgetkit.config import load_config
    from forgetkit.train import loop

    cfg = load_config(args.config, args.overrides)
    setup_logging()
    made: list[Any] = []
    real_make_backend = loop.make_backend

    def recording_make_backend(dcfg: Any, tcfg: Any) -> Any:
        made.append(real_make_backend(dcfg, tcfg))
        return made[-1]

    loop.make_backend = recording_make_backend  # the loop looks it up at call time
    result = loop.train(cfg, progress=False)
    backend = made[0]
    report = describe(backend) | {"steps": result.steps, "resumed_from": result.resumed_from}
    (result.out_dir / f"worker-rank{backend.rank}.json").write_text(json.dumps(report))
    if args.save_init is not None and backend.is_main:
        save_init(cfg, args.save_init)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
