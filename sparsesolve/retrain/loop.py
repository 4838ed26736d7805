"""The AST retraining loop, top to bottom: one process or ``torchrun`` data parallelism.

Per optimiser step ``s`` (of ``tokens // (batch_size * seq_len)``):

1. the global batch: ``batch_size`` windows of ``seq_len + 1`` wiki-train tokens at starts drawn from a
   generator seeded with ``(seed, s)`` (so a resumed run and any number of ranks see the same data);
   rank ``r`` of ``W`` takes its ``batch_size / W`` rows, split again into ``grad_accum`` micro-batches;
2. the student's loss (``distill``: ``distillation_loss`` against the frozen teacher's logits computed
   on the fly; else cross-entropy), backward through the straight-through masks; gradients averaged
   over ranks (``all_reduce``), clipped to ``grad_clip``;
   a non-finite loss or gradient norm stops the run with a one-line error (``on_nonfinite="stop"``) or
   skips the step (``"skip"``, logged), before any weight changes;
3. the masked decay at ``annealed_lambda(s)`` (``decay.py``: update form inside the AdamW step,
   gradient form added to the gradient before it), the AdamW step (``MaskedAdamW``) with linear
   warmup then cosine decay to ``min_lr_ratio * lr``;
4. every ``mask_interval`` steps after ``fixed_mask_steps``: masks re-selected from the dense
   magnitudes (N:M), the flip rate logged;
5. before the first step and every ``eval_every`` steps: perplexity on the wiki validation split; every ``checkpoint_every``
   steps: a checkpoint (model, masks, optimiser, log) that ``resume`` continues exactly.

At the end the master weights are projected onto their masks (exact N:M) and the model is saved as a
standard transformers folder (plus ``masks.safetensors``, ``slorb.safetensors`` when SLoRB is on, and
``report.json`` with the log); on rank 0 the student is left as saved (plain modules, SLoRB attached as
``load_model`` attaches it), so it gives the same logits as the reloaded folder. A checkpoint is never
written with non-finite weights (every rank checks), and ``resume`` refuses a checkpoint trained with
another decay form or strength. Dropout stays off (eval mode), so a step is a deterministic function of
the weights and the data.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sparsesolve.core import distributed
from sparsesolve.lm.data import corpus_tokens
from sparsesolve.lm.environment import environment
from sparsesolve.lm.evaluate import perplexity
from sparsesolve.lm.output import OutputFolder, atomic_write
from sparsesolve.lm.slorb import SLORB_FILE, attach_slorb
from sparsesolve.retrain.config import DEFAULT_LAMBDA, RetrainConfig
from sparsesolve.retrain.decay import annealed_lambda, decay_terms, masked_decay_gradient_
from sparsesolve.retrain.distill import distillation_loss
from sparsesolve.retrain.optimizer import MaskedAdamW
from sparsesolve.retrain.sparse_linear import SparseLinear

__all__ = ["retrain", "train_batch", "unwrap"]

def train_batch(tokens: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """The global batch of ``step``: ``batch_size x (seq_len + 1)`` token windows (inputs and next tokens)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])


def _loss(student: PreTrainedModel, teacher: PreTrainedModel | None, window: torch.Tensor,
          config: RetrainConfig) -> dict[str, torch.Tensor]:
    inputs, labels = window[:, :-1], window[:, 1:]
    autocast = torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16")
    with autocast:
        logits = student(inputs).logits
        if teacher is None:
            ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
            return {"loss": ce, "ce": ce, "kl": torch.zeros((), device=ce.device)}
        with torch.no_grad():
            teacher_logits = teacher(inputs).logits
    return distillation_loss(logits, teacher_logits, labels, config.temperature, config.alpha_kd)


def unwrap(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Project every ``SparseLinear`` onto its mask and put its plain module back; returns the masks
    (and leaves SLoRB modules out of the model: ``slorb_state`` saves them first)."""
    masks = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):
            module.project_()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.module)
            masks[name] = module.mask.clone()
    return masks


def slorb_state(layers: dict[str, SparseLinear]) -> dict[str, torch.Tensor]:
    """SLoRB tensors by ``NAME.scale`` / ``NAME.projection`` (empty without SLoRB)."""
    return {f"{name}.{key}": value.detach().contiguous().cpu() for name, layer in layers.items() if layer.slorb is not None
            for key, value in layer.slorb.state_dict().items()}


def retrain(student: PreTrainedModel, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
            layers: dict[str, SparseLinear], config: RetrainConfig, out: str | Path, *, resume: bool = False,
            overwrite: bool = False, progress: bool = True, start: dict[str, Any] | None = None) -> dict[str, Any]:
    """Retrain ``student`` (its decoder linears wrapped as ``layers``, ``start.sparse_student``) towards
    ``teacher`` and save it to ``out`` (module docstring). Returns the report (config, log, timings)."""
    rank, world = distributed.rank(), distributed.world_size()
    config.check(world)
    folder = OutputFolder(out, overwrite=overwrite, resume=resume)
    if rank == 0:
        folder.begin()
    if world > 1:
        dist.barrier()
    checkpoint_path = folder.checkpoints / "retrain.pt"
    teacher.requires_grad_(False)
    student.eval()  # dropout off: deterministic steps
    params = [p for p in student.parameters() if p.requires_grad]
    decay, no_decay = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    optimizer = MaskedAdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(config.beta1, config.beta2))
    log: list[dict[str, Any]] = []
    first = 0
    lambda_max = config.lambda_max if config.lambda_max is not None else DEFAULT_LAMBDA[config.decay]
    decay_setting = {"decay": config.decay, "lambda_max": lambda_max}
    if resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=False)
        if state.get("decay_setting", decay_setting) != decay_setting:
            raise ValueError(f"{checkpoint_path} was trained with {state['decay_setting']}, this run asks for "
                             f"{decay_setting}: pass the same --decay and --lambda-max to --resume")
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        log, first = state["log"], state["step"]
    elif world > 1:
        for p in student.state_dict().values():
            dist.broadcast(p, 0)
    tokens = corpus_tokens(tokenizer, "wiki", "train")
    sparse = list(layers.values())
    micro = config.batch_size // (world * config.grad_accum)
    device = next(student.parameters()).device
    started = time.perf_counter()
    if first == 0:  # the starting point, so every run's curve begins at its one-shot perplexity
        log.append({"step": 0, "tokens": 0, "wiki_validation_ppl": perplexity(
            student, "wiki", config.seq_len, config.eval_windows, tokenizer=tokenizer, split="validation", progress=False)})
    bar = tqdm(range(first, config.steps), desc="retrain", unit="step", disable=not progress or rank != 0,
               initial=first, total=config.steps)
    for step in bar:
        lr = config.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = train_batch(tokens, step, config.batch_size, config.seq_len, config.seed).to(device)
        mine = batch[rank * micro * config.grad_accum:(rank + 1) * micro * config.grad_accum]
        optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "ce": 0.0, "kl": 0.0}
        for part in mine.split(micro):
            parts = _loss(student, None if not config.distill else teacher, part, config)
            (parts["loss"] / config.grad_accum).backward()
            for key in totals:
                totals[key] += float(parts[key].detach()) / config.grad_accum
        if world > 1:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            summed = torch.tensor([totals["loss"], totals["ce"], totals["kl"]], device=device)
            dist.all_reduce(summed)
            totals = dict(zip(totals, (summed / world).tolist()))
        norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
        entry = {"step": step + 1, "tokens": (step + 1) * config.batch_size * config.seq_len, "lr": lr, **totals,
                 "grad_norm": norm}
        if not (math.isfinite(totals["loss"]) and math.isfinite(norm)):
            # every rank sees the same all-reduced loss and gradients, so all decide alike
            if config.on_nonfinite == "stop":
                raise FloatingPointError(
                    f"non-finite {'loss' if not math.isfinite(totals['loss']) else 'gradient norm'} at step {step + 1}; "
                    f"weights unchanged, last checkpoint in {folder.checkpoints}: lower --lr and --resume, "
                    "or --on-nonfinite skip")
            optimizer.zero_grad(set_to_none=True)
            entry["skipped"] = True
        else:
            lam = annealed_lambda(step, lambda_max, round(config.decay_warmup * config.steps))
            if config.decay == "gradient":
                masked_decay_gradient_(sparse, lam)
            optimizer.step(decay=decay_terms(sparse, lam) if config.decay == "update" else None)
            entry["lambda"] = lam
        refresh = not config.fixed_mask and step + 1 > config.fixed_mask_steps and (step + 1) % config.mask_interval == 0
        if refresh:
            flips = sum(layer.refresh_mask() for layer in sparse)
            entry["flip_rate"] = flips / sum(layer.mask.numel() for layer in sparse)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            entry["wiki_validation_ppl"] = perplexity(student, "wiki", config.seq_len, config.eval_windows,
                                                      tokenizer=tokenizer, split="validation", progress=False)
        log.append(entry)
        bar.set_postfix(loss=f"{totals['loss']:.3f}", kl=f"{totals['kl']:.3f}",
                        flips=f"{entry.get('flip_rate', 0.0):.4f}")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            finite = torch.tensor(float(all(bool(torch.isfinite(p).all()) for p in student.parameters())), device=device)
            if world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not bool(finite):
                raise FloatingPointError(f"non-finite weights at step {step + 1}: no checkpoint written; "
                                         f"the last good one is in {folder.checkpoints}")
        if rank == 0 and ((step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps):
            state = {"model": student.state_dict(), "optimizer": optimizer.state_dict(), "log": log, "step": step + 1,
                     "decay_setting": decay_setting}
            checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(checkpoint_path, lambda path: torch.save(state, path))
    report = {"config": asdict(config), "steps": config.steps, "log": log, "seconds": time.perf_counter() - started,
              "ranks": world, "resumed_at": first, "start": start or {}, "environment": environment(),
              "slorb_parameters": sum(layer.slorb.parameter_count() for layer in sparse if layer.slorb is not None),
              "parameters": sum(p.numel() for p in student.parameters())}
    if rank == 0:
        extra = slorb_state(layers)
        masks = unwrap(student)
        if extra:
            k = next(layer.slorb.k for layer in sparse if layer.slorb is not None)
            save_file(extra, str(folder.staging / SLORB_FILE), metadata={"k": str(k)})
        folder.commit(student, tokenizer, masks, report)
        if extra:  # the student as saved: what load_model gives back
            attach_slorb(student, {key: value.to(device) for key, value in extra.items()}, k)
    if world > 1:
        dist.barrier()
    return report
