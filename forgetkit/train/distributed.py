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
import pickle
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


def retie_shared(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Make the entries of tied parameters (e.g. ``lm_head.weight`` = ``embed_tokens.weight``)
    one tensor again.

    Gathering a sharded model (FSDP2 ``full_state_dict``) materialises every *name* separately, so
    tied weights come back as equal but distinct tensors; ``save_pretrained`` only drops the
    duplicate of tensors that share storage, and would otherwise write both.
    """
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            if name in sd and first[id(p)] in sd:
                sd[name] = sd[first[id(p)]]
        else:
            first[id(p)] = name
    return sd


def _ensure_process_group(cpu: bool) -> None:
    """Give a plain ``python`` (no torchrun) run of a sharded strategy a 1-process group.

    FSDP2's device mesh and ``deepspeed.initialize`` need torch.distributed even for one process
    (DeepSpeed otherwise falls back to MPI discovery); accelerate creates a group only for >1
    process. An in-memory HashStore needs no port and no environment variables.
    """
    if dist.is_initialized():  # torchrun / accelerate launch: accelerate made the group
        return
    backend = "gloo" if cpu else "nccl"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    # DeepSpeed reads these instead of asking torch.distributed.
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"
                 }.items():
        os.environ.setdefault(k, v)


_MATMUL_CACHE: dict[str, float] = {}


def matmul_gflops(dtype: torch.dtype, device: str = "cpu", n: int = 512,
                  seconds: float = 0.3) -> float:
    """Measured throughput of an ``n x n`` matmul in ``dtype`` on ``device`` (GFLOP/s; best of
    a few timed batches after a warm-up; cached per process)."""
    import time

    key = f"{dtype}/{device}/{n}"
    if key in _MATMUL_CACHE:
        return _MATMUL_CACHE[key]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    reps, end = 4, time.perf_counter() + seconds
    while True:
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps)
        if time.perf_counter() > end:
            break
    _MATMUL_CACHE[key] = 2 * n**3 / best / 1e9
    return _MATMUL_CACHE[key]


#: ``auto`` picks bf16 on a CPU only when its bf16 matmul is at least this much faster.
AUTO_BF16_MIN_SPEEDUP = 1.25


def resolve_mixed_precision(requested: str, cpu: bool) -> tuple[str, str]:
    """(precision to train in, why) for ``training.mixed_precision``; only ``auto`` is
    resolved: on CUDA bf16 where the device supports it, on a CPU bf16 only where a measured
    bf16 matmul is >= AUTO_BF16_MIN_SPEEDUP x fp32's (CPUs differ: an Intel Xeon with AMX ran
    it ~3x faster, the AMD EPYC here has no fast bf16), else ``no`` (fp32)."""
    if requested != "auto":
        return requested, "as configured"
    if not cpu and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16", "CUDA device with bf16 support"
        return "no", "CUDA device without bf16 support"
    # interleaved rounds, best of each: a busy machine slows both, not one
    f32 = b16 = 0.0
    for _ in range(3):
        for k in list(_MATMUL_CACHE):
            del _MATMUL_CACHE[k]
        f32 = max(f32, matmul_gflops(torch.float32, n=1024, seconds=0.1))
        b16 = max(b16, matmul_gflops(torch.bfloat16, n=1024, seconds=0.1))
    why = f"CPU matmul bf16 {b16:.0f} vs fp32 {f32:.0f} GFLOP/s"
    return ("bf16" if b16 >= AUTO_BF16_MIN_SPEEDUP * f32 else "no"), why


def check_launcher_settings(dcfg: DistributedConfig, tcfg: TrainingConfig,
                            env: dict[str, str] | None = None) -> None:
    """Settings an ``accelerate launch`` passes through the environment, against the config.

    Precedence, one rule: **the forgetkit config wins** (config > launcher > default). The
    training precision is ``training.mixed_precision`` (default ``no``); a launcher that asks
    for another one (``mixed_precision:`` in its config file, ``--mixed_precision``: the
    ``ACCELERATE_MIXED_PRECISION`` variable) gets a warning that says which precision trains and
    how to change it. The sharding strategy is ``distributed.strategy`` (forgetkit applies FSDP2
    and DeepSpeed itself): a launcher flag ``--use_fsdp`` / ``--use_deepspeed``
    (``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``) is refused, with the config key to
    use instead, rather than half-applied by accelerate's plugins.

    Raises:
        ConfigError: a launcher strategy flag is set.
    """
    from forgetkit.config import ConfigError

    env = dict(os.environ) if env is None else env
    on = {"1", "true", "yes"}
    for var, flag, strategy in (("ACCELERATE_USE_FSDP", "--use_fsdp", "fsdp"),
                                ("ACCELERATE_USE_DEEPSPEED", "--use_deepspeed", "deepspeed")):
        if env.get(var, "").strip().lower() in on:
            raise ConfigError(
                f"the launcher asks for {strategy} ({flag} / {var}=true), but forgetkit applies "
                f"the sharding strategy of its config itself: drop {flag} from the launcher "
                f"(and any {strategy} section of its config file) and set "
                f"distributed.strategy={strategy} (now '{dcfg.strategy}')")
    asked = env.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if asked and asked != tcfg.mixed_precision:
        log.warning("the launcher asks for mixed precision '%s' (ACCELERATE_MIXED_PRECISION), "
                    "the config's training.mixed_precision is '%s': the config wins, training "
                    "runs in %s; set training.mixed_precision=%s to train in %s", asked,
                    tcfg.mixed_precision, "fp32" if tcfg.mixed_precision == "no"
                    else tcfg.mixed_precision, asked, asked)


class Backend:
    """Base/single-process and DDP backend (via accelerate)."""

    name = "single"

    def __init__(self, dcfg: DistributedConfig, tcfg: TrainingConfig) -> None:
        from accelerate import Accelerator

        cpu = dcfg.cpu if dcfg.cpu is not None else not torch.cuda.is_available()
        # Gradient accumulation is done by the loop itself (token-normalised), so accelerate
        # must not divide the loss by the number of micro-steps: gradient_accumulation_steps=1.
        check_launcher_settings(dcfg, tcfg)
        if tcfg.mixed_precision == "auto":  # resolved once, here; the backend keeps the answer
            import dataclasses

            chosen, why = resolve_mixed_precision("auto", cpu)
            log.info("training.mixed_precision auto -> %s (%s)", chosen, why)
            tcfg = dataclasses.replace(tcfg, mixed_precision=chosen)  # type: ignore[arg-type]
        # The config's precision is passed explicitly: it wins over the launcher's (above).
        mp = tcfg.mixed_precision if dcfg.strategy != "deepspeed" else "no"
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mp)
        if dcfg.strategy in ("fsdp", "deepspeed"):
            _ensure_process_group(cpu)
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
        # Never plain pickle: torch's reader unpickles ``.metadata`` and its planner reads
        # non-tensor entries with torch.load(weights_only=False). See safe_dcp_reader.
        reader = safe_dcp_reader(path / "state")
        reader.read_metadata()  # a refused file fails here, with its own one-line message
        dcp.load(state, storage_reader=reader, planner=safe_dcp_planner())
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
        return retie_shared(sd, self.model) if self.is_main else None


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO-1/2/3 through ``deepspeed.initialize`` (CPU gloo or GPU nccl).

    DeepSpeed owns gradient reduction, clipping and the optimizer step. Two things differ from how
    DeepSpeed is normally driven, both because the loop owns accumulation and loss scaling:

    * The engine would divide every micro-batch loss by ``gradient_accumulation_steps``; the loop's
      loss is already normalised by the step's global target-token count, so ``backward`` passes
      ``scale_wrt_gas=False`` (no scaling at all, rather than multiply-then-divide).
    * The engine counts micro-steps in ``step()`` to find the accumulation boundary and expects
      ``step()`` after *every* micro-batch. The loop calls ``optimizer_step`` once per optimizer
      step, so the boundary is set explicitly per micro-batch in ``sync_context`` (the API
      DeepSpeed documents for this calling pattern). Without it, accumulation > 1 reduced and
      stepped only on every ``accum``-th call: half the steps were silently skipped.
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
        """The DeepSpeed config, derived from forgetkit's config (the single source of truth)."""
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
            "zero_allow_untested_optimizer": True,  # the torch AdamW/SGD forgetkit builds
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
        return contextlib.nullcontext()  # the engine runs the module in bf16/fp16 itself

    def sync_context(self, sync):
        # Reduce gradients (and let step() update) only on the last micro-batch of the step.
        self.model.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss):
        self.model.backward(loss, scale_wrt_gas=False)  # the loop's loss is already normalised

    def clip_grad_norm(self, max_norm):
        return torch.zeros(())  # clipping happens inside engine.step(); norm read after it

    def optimizer_step(self):
        self.model.step()  # reduces (ZeRO-1), clips, steps, zeroes the gradients

    def grad_norm_after_step(self) -> torch.Tensor | None:
        """The global gradient norm before clipping, as the engine computed it in ``step()``;
        None when the engine did not compute one (ZeRO-1/2 without gradient clipping). Not 0.0:
        a zero norm means a collapsed run to the loop."""
        n = self.model.get_global_grad_norm()
        return None if n is None else torch.as_tensor(n, dtype=torch.float32)

    def full_state_dict(self):
        """The fp32 master weights, gathered (collectively) on rank 0.

        Not ``module.state_dict()`` / ``_zero3_consolidated_16bit_state_dict()``: with bf16/fp16
        the engine's module holds rounded 16-bit copies, while single/DDP/FSDP save the fp32
        weights the optimizer updates. ``safe_get_full_fp32_param`` assembles one parameter's
        fp32 master from the ZeRO partitions (an all-reduce / all-gather over the data-parallel
        group), so every rank must walk the parameters in the same order -- they do, it is the
        same module.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.unwrap()
        sd: dict[str, torch.Tensor] = {}
        seen: dict[int, str] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) in seen:  # tied weight: the same tensor under a second name
                if self.is_main:
                    sd[name] = sd[seen[id(p)]]
                continue
            seen[id(p)] = name
            full = safe_get_full_fp32_param(p)  # collective; None for frozen parameters
            if full is None:
                full = self._gather_param(p)
            if self.is_main:
                sd[name] = full.detach().to("cpu", copy=True)
        if not self.is_main:
            return None
        for mod_name, mod in module.named_modules():  # persistent buffers, e.g. position ids
            for b_name, buf in mod.named_buffers(recurse=False):
                if buf is not None and b_name not in mod._non_persistent_buffers_set:
                    sd[f"{mod_name}.{b_name}" if mod_name else b_name] = buf.detach().cpu()
        return sd

    def _gather_param(self, p: torch.nn.Parameter) -> torch.Tensor:
        """A parameter with no fp32 master (frozen): gather it from ZeRO-3 shards if needed."""
        if not hasattr(p, "ds_id"):
            return p.data
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):  # collective
            return p.data.clone()

    def save_training_state(self, path):
        self.model.save_checkpoint(str(path / "deepspeed"), tag="state")  # collective

    def load_training_state(self, path):
        # DeepSpeed's TorchCheckpointEngine.load calls torch.load(weights_only=False), which
        # runs whatever a crafted file names. For this load its engine reads with
        # weights_only=True instead, allowing only the few DeepSpeed classes its ZeRO files
        # hold (safe_globals: instances are rebuilt from their state, nothing is called).
        engine = self.model.checkpoint_engine

        def load(p: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(p, map_location=map_location, weights_only=True)

        engine.load = load  # an instance attribute: shadows the class's method, removed below
        try:
            load_path, _ = self.model.load_checkpoint(str(path / "deepspeed"), tag="state")
        finally:
            del engine.load
        if load_path is None:  # DeepSpeed only logs a warning when nothing was loaded
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {path / 'deepspeed'}")


def _deepspeed_safe_globals() -> list[Any]:
    """The non-tensor classes in DeepSpeed ZeRO checkpoint files (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO-1/2/3 checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


# ----------------------------------------------------------------------------- safe DCP loading

def _safe_global(module: str, name: str) -> bool:
    """What a DCP ``.metadata`` pickle may name, decided on the names *before* anything is
    imported: DCP's own metadata classes (constructing a dataclass runs no user code),
    torch.Size, dtypes and layouts, and paths. Nothing with side effects (os.system, eval, ...)."""
    if module.startswith("torch.distributed.checkpoint."):
        return True  # and must turn out to be a class: checked after the import
    if module == "torch":
        return name == "Size" or isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.layout, torch.memory_format))
    if (module, name) in {("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                          ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}:
        return True
    return module == "pathlib" and name in ("PosixPath", "PurePosixPath", "Path")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        ok = _safe_global(module, name)
        obj = super().find_class(module, name) if ok else None
        if not ok or (module.startswith("torch.distributed.checkpoint.")
                      and not isinstance(obj, type)):
            raise pickle.UnpicklingError(
                f"checkpoint metadata names {module}.{name}, which a torch.distributed.checkpoint "
                "file never contains: refusing to load it (the file was crafted or damaged; "
                "delete that checkpoint)")
        return obj


def safe_dcp_reader(path: Path) -> Any:
    """A FileSystemReader whose ``.metadata`` is read by an allow-list unpickler.

    (Tensors themselves are already read with ``torch.load(weights_only=True)`` by torch.)
    """
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            mpath = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(mpath, "rb") as fh:
                try:
                    metadata = _RestrictedUnpickler(fh).load()
                except pickle.UnpicklingError as e:
                    raise pickle.UnpicklingError(f"{mpath}: {e}") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def safe_dcp_planner() -> Any:
    """DefaultLoadPlanner whose non-tensor entries (optimizer hyper-parameters: floats, lists,
    bools) load with ``torch.load(weights_only=True)``: plain types only, no arbitrary objects."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


def make_backend(dcfg: DistributedConfig, tcfg: TrainingConfig) -> Backend:
    cls = {"auto": Backend, "ddp": Backend, "fsdp": FSDPBackend,
           "deepspeed": DeepSpeedBackend}[dcfg.strategy]
    return cls(dcfg, tcfg)
