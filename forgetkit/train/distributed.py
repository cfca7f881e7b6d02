"""Execution backends: single process, DDP, FSDP2 and DeepSpeed ZeRO behind one small surface.

The training loop calls the same handful of methods whatever the strategy:
``wrap -> (sync_context, backward)* -> clip_grad_norm -> optimizer_step -> ...``.

Why not accelerate alone: on CPU, ``Accelerator(cpu=True)`` gives correct gloo DDP, but it
silently ignores its FSDP and DeepSpeed plugins there (it wraps DDP instead). forgetkit therefore
uses accelerate for the process group, device placement, DDP and autocast, and applies the sharded
strategies itself -- torch FSDP2 ``fully_shard`` per decoder layer (as torchtune does) and
``deepspeed.initialize`` -- which run the same way on CPU (gloo) and GPU (nccl). Every path is
therefore exercised by the 2-process CPU tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from forgetkit.config import DistributedConfig, TrainingConfig

log = logging.getLogger("forgetkit")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (the largest ModuleList of same-typed modules)."""
    best: list[torch.nn.Module] = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > len(best):
            kinds = {type(m) for m in mod}
            if len(kinds) == 1:
                best = list(mod)
    return best


class Backend:
    """Base/single-process and DDP backend (via accelerate)."""

    name = "single"

    def __init__(self, dcfg: DistributedConfig, tcfg: TrainingConfig) -> None:
        from accelerate import Accelerator

        cpu = dcfg.cpu if dcfg.cpu is not None else not torch.cuda.is_available()
        # Gradient accumulation is done by the loop itself (token-normalised), so accelerate
        # must not divide the loss by the number of micro-steps: gradient_accumulation_steps=1.
        mp = tcfg.mixed_precision if dcfg.strategy != "deepspeed" else "no"
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mp)
        self.dcfg, self.tcfg = dcfg, tcfg
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        if self.world_size > 1 and self.name == "single":
            self.name = "ddp"

    # ---- set-up
    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Place (and for FSDP, shard) the model before regularizers snapshot theta0."""
        return model.to(self.device)

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
             ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = self.accelerator.prepare_model(model)
        self.model, self.optimizer = model, optimizer
        return model, optimizer

    def unwrap(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # ---- step
    def sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        """No gradient all-reduce on micro-steps that are not the last of an optimizer step."""
        if sync or self.world_size == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """Clip (when max_norm) and return the global gradient norm, without a host sync."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if max_norm is None:
            max_norm = float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def local_params(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) pairs as the optimizer sees them, names of the unwrapped model."""
        seen: set[int] = set()
        for n, p in self.unwrap().named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield n, p

    # ---- collectives
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    # ---- checkpoints
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on CPU for saving an HF checkpoint (only rank 0 gets them)."""
        sd = self.accelerator.get_state_dict(self.model)
        return sd if self.is_main else None

    def save_training_state(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path / "state"))

    def load_training_state(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path / "state"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])


class FSDPBackend(Backend):
    """torch FSDP2: ``fully_shard`` each decoder layer, then the root (full shard, ZeRO-3-like).

    Parameters become DTensors sharded on dim 0 over the ranks; each rank's optimizer state and
    gradients cover only its shard. Regularizer anchors are snapshotted from the local shards.
    """

    name = "fsdp"

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model = model.to(self.device)
        dev = "cuda" if self.device.type == "cuda" else "cpu"
        mesh = init_device_mesh(dev, (self.world_size,))
        mp = None
        if self.tcfg.mixed_precision != "no":
            dt = torch.bfloat16 if self.tcfg.mixed_precision == "bf16" else torch.float16
            mp = MixedPrecisionPolicy(param_dtype=dt, reduce_dtype=torch.float32)
        kw: dict[str, Any] = {"mesh": mesh,
                              "reshard_after_forward": self.dcfg.fsdp_reshard_after_forward}
        if mp is not None:
            kw["mp_policy"] = mp
        layers = decoder_layers(model)
        if not layers:
            raise ValueError("FSDP: could not find the model's decoder layers to shard")
        for layer in layers:
            fully_shard(layer, **kw)
        fully_shard(model, **kw)
        return model

    def wrap(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        return model, optimizer

    def unwrap(self) -> torch.nn.Module:
        return self.model

    def autocast(self):
        return contextlib.nullcontext()  # FSDP2's MixedPrecisionPolicy casts instead

    def sync_context(self, sync: bool):
        self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm):
        norm = super().clip_grad_norm(max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def full_state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(self.model, options=opts)  # collective: every rank calls it
        return sd if self.is_main else None


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO-1/2/3 through ``deepspeed.initialize`` (CPU gloo or GPU nccl).

    DeepSpeed owns gradient reduction, clipping and the optimizer step. The loop's token-normalised
    loss is multiplied by the accumulation count because the engine divides by it again.
    """

    name = "deepspeed"

    def __init__(self, dcfg, tcfg):
        super().__init__(dcfg, tcfg)
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise RuntimeError("distributed.strategy=deepspeed needs DeepSpeed: "
                               "pip install 'forgetkit[deepspeed]'") from None

    def ds_config(self) -> dict[str, Any]:
        t, d = self.tcfg, self.dcfg
        zero: dict[str, Any] = {"stage": d.zero_stage}
        if d.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        if d.offload_params:
            if d.zero_stage != 3:
                raise ValueError("distributed.offload_params needs distributed.zero_stage=3")
            zero["offload_param"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        return {
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "gradient_clipping": t.max_grad_norm or 0.0,
            "zero_optimization": zero,
            "bf16": {"enabled": t.mixed_precision == "bf16"},
            "fp16": {"enabled": t.mixed_precision == "fp16"},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def wrap(self, model, optimizer):
        import deepspeed

        os.environ.setdefault("LOCAL_RANK", str(self.accelerator.local_process_index))
        engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                    config=self.ds_config())
        self.model, self.optimizer = engine, ds_opt
        return engine, ds_opt

    def unwrap(self):
        return getattr(self.model, "module", self.model)

    def autocast(self):
        return contextlib.nullcontext()

    def sync_context(self, sync):
        return contextlib.nullcontext()  # the engine knows the accumulation boundary itself

    def backward(self, loss):
        # The engine scales the loss by 1/gradient_accumulation_steps; undo it.
        self.model.backward(loss * self.tcfg.gradient_accumulation_steps)

    def clip_grad_norm(self, max_norm):
        return torch.zeros(())  # clipping happens inside engine.step(); norm read after it

    def optimizer_step(self):
        self.model.step()

    def grad_norm_after_step(self) -> torch.Tensor:
        n = self.model.get_global_grad_norm()
        return torch.as_tensor(0.0 if n is None else n, dtype=torch.float32)

    def full_state_dict(self):
        if self.dcfg.zero_stage == 3:
            sd = self.model._zero3_consolidated_16bit_state_dict()  # collective
        else:
            sd = {k: v.detach().cpu() for k, v in self.model.module.state_dict().items()}
        return sd if self.is_main else None

    def save_training_state(self, path):
        self.model.save_checkpoint(str(path / "deepspeed"), tag="state")

    def load_training_state(self, path):
        self.model.load_checkpoint(str(path / "deepspeed"), tag="state")


def make_backend(dcfg: DistributedConfig, tcfg: TrainingConfig) -> Backend:
    cls = {"auto": Backend, "ddp": Backend, "fsdp": FSDPBackend,
           "deepspeed": DeepSpeedBackend}[dcfg.strategy]
    return cls(dcfg, tcfg)
