"""2-process FSDP2 worker: L2-SP and EWC in loss mode (``grads_in_params=False``, the
``before_clip`` placement of forgetkit.integrations) on DTensor shards, theta0 and F captured
from the full model before sharding. Writes ``rank<r>.json`` with each rank's checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(out: Path) -> int:
    import torch.distributed as dist

    from forgetkit.config import DistributedConfig, ModelConfig, TrainingConfig
    from forgetkit.models import load_model
    from forgetkit.regularizers import EWC, L2SP, RegContext
    from forgetkit.regularizers.fisher import local_tensor
    from forgetkit.train.distributed import make_backend

    backend = make_backend(DistributedConfig(strategy="fsdp", cpu=True), TrainingConfig())
    tiny = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64}
    model, _ = load_model(ModelConfig(random_init=tiny, tokenizer="byte"), seed=0)
    g = torch.Generator().manual_seed(7)
    fisher_full = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()}
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    l2, ewc = L2SP(3.0), EWC(2.0, include=["mlp"])
    l2.capture_reference(model)
    # EWC's Fisher comes from a file here (a known F to check against)
    from forgetkit.regularizers.fisher import save_fisher

    fpath = out / "fisher.safetensors"
    if backend.rank == 0:
        save_fisher(fpath, fisher_full, {"estimator": "empirical", "n_examples": 1})
    dist.barrier()
    ewc.fisher_path = fpath
    ewc.capture_reference(model, rank=backend.rank, world_size=backend.world_size,
                          all_reduce=backend.all_reduce_sum)
    model = backend.shard(model)
    backend.model = model
    with torch.no_grad():  # "the checkpoint's weights": every shard moves
        for p in model.parameters():
            local_tensor(p).add_(torch.randn(local_tensor(p).shape, generator=g) * 0.05)
    ctx = RegContext(model=model, params=backend.local_params, device=backend.device,
                     rank=backend.rank, world_size=backend.world_size, strategy="fsdp",
                     grads_in_params=False, all_reduce_sum=backend.all_reduce_sum)
    report: dict[str, object] = {}
    for reg, weight in ((l2, None), (ewc, fisher_full)):
        reg.prepare(ctx)
        assert reg.mode == "loss" and reg.sharded
        for p in model.parameters():
            p.grad = None
        v = reg.penalty(ctx, {})
        v.backward()
        # independent recomputation on full tensors
        full_val, max_err, checked = 0.0, 0.0, 0
        for n, p in zip(reg.names, reg.params, strict=True):
            cur = p.full_tensor().detach()
            d = cur - theta0[n]
            w = weight[n] if weight is not None else torch.ones_like(d)
            full_val += float((w * d * d).sum()) * reg.lam / 2
            expect = reg.lam * w * d  # the full gradient; this rank owns its shard's part
            from torch.distributed.tensor import distribute_tensor

            mine = distribute_tensor(expect, p.device_mesh, p.placements).to_local()
            got = local_tensor(p.grad) if p.grad is not None else torch.zeros_like(mine)
            max_err = max(max_err, float((got - mine).abs().max()) if mine.numel() else 0.0)
            checked += mine.numel()
        report[reg.name] = {"value": float(v.detach()), "full_value": full_val,
                            "max_grad_err": max_err, "checked": checked,
                            "names": len(reg.names)}
    (out / f"rank{backend.rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
