"""A ``forgetkit.integrations.RegularizedTrainer`` run with EWC, for tests/test_integrations.py
(not a test module itself).

    python tests/integrations_worker.py OUT --micro 2 --accum 2                  (1 process)
    python -m torch.distributed.run --nproc_per_node 2 tests/integrations_worker.py OUT \\
        --micro 2 --accum 1                                                      (DDP, gloo)

Both take the same global batch of 4 examples per optimizer step, in the same order (the
Trainer's seeded sampler; accelerate gives rank r the r-th micro-batch of each global batch).
Rank 0 writes ``OUT/weights.safetensors``, ``OUT/log.json`` (the Trainer's log_history) and
``OUT/report.json`` (world size, the strategy and ZeRO stage the integration detected, the model
wrapper that ran; under DeepSpeed also the message refusing ``placement="after_clip"``); EWC's
Fisher is written to ``OUT/run/fisher-ewc.safetensors``. ``--zero 2`` runs under DeepSpeed
ZeRO-2 (on CPU too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: sys.path[0] is tests/, not the repository
    sys.path.insert(0, str(REPO))

DATA = REPO / "experiments" / "data"
MAX_STEPS = 3
LAM = 100.0  # EWC strength: its gradient term dominates the clipped norm from step 2 on


def hf_rows(examples: list[Any]) -> list[dict[str, list[int]]]:
    """forgetkit examples (pre-shifted labels) -> HF rows (labels aligned with input_ids; the
    model shifts them)."""
    return [{"input_ids": list(e.input_ids), "labels": [-100] + list(e.labels[:-1])}
            for e in examples]


def pad_collator(pad_id: int) -> Any:
    import torch

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def read_jsonl(path: Path, n: int) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()[:n]]


def deepspeed_config(stage: int) -> dict[str, Any]:
    """ZeRO-``stage`` with torch's AdamW; the rest filled in by the Trainer ("auto")."""
    return {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto",
                                                      "eps": "auto", "weight_decay": "auto",
                                                      "torch_adam": True}}}


def run(out: Path, micro: int, accum: int, zero: int | None = None) -> Any:
    """Train MAX_STEPS steps (under DeepSpeed ZeRO-``zero`` when given); returns the trainer
    (rank 0 also writes the files above)."""
    from safetensors.torch import save_file
    from transformers import TrainingArguments

    from forgetkit.config import ModelConfig
    from forgetkit.integrations import RegularizedTrainer, fisher_batches, to_examples
    from forgetkit.models import load_model
    from forgetkit.regularizers import EWC

    tiny = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 256}
    model, tok = load_model(ModelConfig(random_init=tiny, tokenizer="byte"))
    task = to_examples(read_jsonl(DATA / "smoke_task.jsonl", 32), tok, format="instruction",
                       max_length=256)
    ewc = EWC(LAM, batches=fisher_batches(read_jsonl(DATA / "smoke_general.jsonl", 16), tok,
                                          format="text", max_length=256, batch_size=4,
                                          examples=16))
    args = TrainingArguments(
        output_dir=str(out / "run"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum, max_steps=MAX_STEPS, learning_rate=1e-3,
        lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, optim="adamw_torch",
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        deepspeed=deepspeed_config(zero) if zero is not None else None)
    kw = dict(model=model, args=args, train_dataset=hf_rows(task),
              data_collator=pad_collator(tok.pad_token_id))
    refused = None
    if zero is not None:  # after_clip cannot exist under DeepSpeed: refused at construction
        try:
            RegularizedTrainer(**kw, regularizers=[ewc], placement="after_clip")
        except NotImplementedError as e:
            refused = str(e)
    trainer = RegularizedTrainer(**kw, regularizers=[ewc])
    trainer.train()
    acc = trainer.accelerator
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().clone().contiguous()
              for k, v in acc.unwrap_model(trainer.model_wrapped).state_dict().items()}
        save_file(sd, str(out / "weights.safetensors"))
        (out / "log.json").write_text(json.dumps(trainer.state.log_history))
        (out / "report.json").write_text(json.dumps({
            "world_size": acc.num_processes,
            "strategy": trainer._fk.ctx["ewc"].strategy,
            "wrapper": type(trainer.model_wrapped).__name__,
            "zero_stage": trainer._fk.ctx["ewc"].zero_stage, "after_clip_refused": refused}))
    return trainer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--zero", type=int, default=None, help="DeepSpeed ZeRO stage")
    a = ap.parse_args(argv)
    trainer = run(a.out, a.micro, a.accum, a.zero)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    del trainer
    return 0


if __name__ == "__main__":
    sys.exit(main())
