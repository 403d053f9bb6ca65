"""The training loop of ``dude train``: AdamW, warmup + cosine, accumulation, clipping,
checkpoints that resume bit-exactly (and on another number of processes, ``resume.py``),
and a stop on a non-finite loss.

One process or many (torchrun or accelerate: DDP, or FSDP2, see ``distributed.py``). Rank 0
writes the files (every rank its shards of an FSDP checkpoint). The data order is a pure
function of (seed, step) (``batches.py``), so a checkpoint needs no sampler state.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import patch
from ..data import collate_sft
from ..io import load as load_adapter
from ..io import save as save_adapter
from . import (checkpoint, compiling, datafiles, distributed, optim, preempt, rundir, runlock, sharded_checkpoint,
               trackers)
from .batches import DataOrder
from .config import TrainConfig
from .options import to_dict
from .progress import Progress
from .resume import global_batch, resume


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float
    wall_time_s: float
    peak_memory_mb: float
    eval: dict[str, Any] | None = None


@dataclass
class _State:
    model: nn.Module  # unwrapped, with dude adapters
    wrapped: nn.Module  # what runs forward (DDP / FSDP / itself)
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0


def train(cfg: TrainConfig, model: nn.Module | None = None, tokenizer: Any = None,
          examples: list[dict[str, list[int]]] | None = None,
          collate: Callable[[list[dict]], dict[str, torch.Tensor]] | None = None) -> TrainResult:
    """Fine-tune ``cfg.adapter`` on ``cfg.data`` and write the run to ``cfg.run.output_dir``.

    ``model``/``tokenizer`` (a base model without adapters) and ``examples`` (token ids and
    labels, -100 where no loss) may be passed in; otherwise they come from the config.
    A start that fails (a bad row, a rank too large for a layer) removes the folders it made.
    """
    from .tasks import check_files

    start = time.perf_counter()
    check_files(cfg.eval.tasks, cfg.data)
    r = cfg.run  # every rank checks the trackers are installed, before any folder or model; rank 0 reports
    reporters = trackers.Reporters(r.report_to, r.output_dir, r.run_name, r.project, distributed.launched_rank() == 0)
    strategy = distributed.launcher_strategy(cfg.run.strategy)
    if strategy != cfg.run.strategy:
        if distributed.launched_rank() == 0:
            print(f"accelerate's FSDP config: run.strategy {strategy} (was {cfg.run.strategy})")
        cfg = replace(cfg, run=replace(cfg.run, strategy=strategy))
    new = rundir.new_folders(Path(cfg.run.output_dir))
    d = distributed.setup(cfg.run.device, cfg.run.strategy)
    distributed.quiet_replica(d)
    try:
        with runlock.held_by_main(Path(cfg.run.output_dir), d, "dude train"):  # one run per folder
            result = _train(cfg, d, start, model, tokenizer, examples, collate, reporters)
        reporters.finish()
        return result
    except BaseException:
        reporters.finish(failed=True)
        if d.is_main:  # an error found after the run folder was made (a bad row, a rank too large) leaves no trace
            rundir.remove_new_folders(new)
        raise
    finally:
        distributed.teardown(d)


def _train(cfg: TrainConfig, d: distributed.Dist, start: float, model: nn.Module | None, tokenizer: Any,
           examples: list | None, collate: Callable | None, reporters: trackers.Reporters) -> TrainResult:
    from ..hub import load_model

    sharded = distributed.is_sharded(d, cfg.run.strategy)
    if sharded and cfg.eval.tasks and model is not None:
        raise ValueError("eval.tasks under run.strategy 'fsdp' rebuilds the model from model.name_or_path on rank 0; "
                         "pass no model to train(), or evaluate afterwards with `dude eval --adapter DIR`")
    out = Path(cfg.run.output_dir)
    resolved = to_dict(cfg)
    rundir.prepare(out, resolved, cfg.run.resume, cfg.run.overwrite, clear=d.is_main)
    if cfg.run.resume:
        datafiles.check(out, "resuming would train on other rows: restore it, or start a new run (--overwrite)")
    distributed.barrier(d)
    checkpoint.seed_everything(cfg.run.seed + d.rank)
    if model is None:
        model, tokenizer = load_model(cfg.model.name_or_path, dtype=getattr(torch, cfg.model.dtype))
    if examples is None:
        from .tasks import training_set

        examples, collate = training_set(cfg.data, tokenizer, log=d.is_main)
    collate = collate or partial(collate_sft, pad_token_id=tokenizer.pad_token_id)
    state = _setup(cfg, model, d)
    del model  # state.model from here on (under FSDP, sharded)
    resumed = resume(cfg, d, state.model, state.optimizer, state.scheduler) if cfg.run.resume else None
    state.step = resumed or 0
    if d.is_main:
        _warn_disk_space(cfg, state, out)
        reporters.start(resolved, state.step)  # before config.yaml: a tracker that fails to start leaves no run
        rundir.write_config(out, resolved)
        if not cfg.run.resume:
            datafiles.record(out, cfg.data)
    metrics = rundir.MetricsLog(out / "metrics.jsonl", resumed, reporters.log_record) if d.is_main else None
    order = DataOrder(len(examples), cfg.optim.batch_size, cfg.optim.grad_accum, d.world_size, cfg.run.seed)
    with preempt.Watch() as watch:  # SIGTERM / SIGUSR1: finish the step, save, exit 128+signum
        last_loss = _run_steps(cfg, state, d, order, examples, collate, metrics, out, watch)
    if not math.isfinite(last_loss) and metrics is not None:  # resumed at the last step: no step ran
        last_loss = ([r["loss"] for r in rundir.read_lines(metrics.path)] or [last_loss])[-1]
    result = TrainResult(out, state.step, last_loss, 0.0, optim.peak_memory_mb(d.device))
    with distributed.gathered(state.model):
        if d.is_main:
            save_adapter(state.model, out)
    if d.is_main:
        _finish(cfg, out, result, start, sum(p.numel() for p in state.params))
    if cfg.eval.tasks:
        trained = None if sharded else state.model
        del state  # under FSDP: free the shards before rank 0 rebuilds the whole model
        if sharded:
            gc.collect()
            if d.device.type == "cuda":
                torch.cuda.empty_cache()
        if d.is_main:
            result.eval = _evaluate(cfg, trained, tokenizer, out, d.device)
            reporters.log(trackers.eval_metrics(result.eval), result.steps)
    distributed.barrier(d)
    return result


def _evaluate(cfg: TrainConfig, trained: nn.Module | None, tokenizer: Any, out: Path,
              device: torch.device) -> dict[str, Any]:
    """Evaluate the trained model merged (the deployed model; generation also skips the
    per-step norm of DoRA/DuDe) and write ``eval.json``. ``trained`` is None under FSDP,
    where no rank holds the whole model: it is rebuilt from the base and the adapter
    just written (the residual is recomputed bit-identically, see ``dude.load``)."""
    from .evaluation import evaluate_tasks

    if trained is None:
        from ..hub import load_model

        base, _ = load_model(cfg.model.name_or_path, dtype=getattr(torch, cfg.model.dtype))
        trained = load_adapter(base, out).to(device)
    trained.eval()
    results = evaluate_tasks(cfg.eval, cfg.data, patch.merge(trained), tokenizer)
    rundir.write_json(out / "eval.json", results)
    return results


def _setup(cfg: TrainConfig, model: nn.Module, d: distributed.Dist) -> _State:
    patch.apply(model, cfg.adapter)
    model.to(d.device)
    if cfg.run.gradient_checkpointing:
        # non-reentrant checkpointing needs no input grads with a frozen embedding
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    model.train()
    if cfg.run.compile:
        compiling.compile_model(model, per_block=cfg.run.gradient_checkpointing or
                                distributed.is_sharded(d, cfg.run.strategy))
    wrapped = distributed.wrap(model, d, cfg.run.strategy)
    params = patch.adapter_parameters(model)  # after wrap: FSDP2 replaces them by shards
    optimizer = optim.build_optimizer(params, cfg.optim)
    scheduler = optim.build_scheduler(optimizer, cfg.optim)
    return _State(model, wrapped, params, optimizer, scheduler)


def _warn_disk_space(cfg: TrainConfig, state: _State, out: Path) -> None:
    """Warn when the disk cannot hold the checkpoints the run keeps at once and its adapter."""
    trainable = sum(p.numel() * p.element_size() for p in state.params)
    adapter = trainable * (2 if cfg.adapter.svd_init else 1)  # PiSSA / DuDe also write A0, B0
    needed = checkpoint.space_needed(trainable, adapter, state.step, cfg.optim.steps, cfg.run.save_every,
                                     cfg.run.keep_checkpoints)
    from ..safe_write import warn_low_space

    warn_low_space(out, needed, f"the checkpoints kept (run.keep_checkpoints {cfg.run.keep_checkpoints}) and the adapter")


def _save_checkpoint(cfg: TrainConfig, state: _State, d: distributed.Dist, out: Path) -> Path:
    rng = checkpoint.rng_state()
    rngs = [rng]
    if d.enabled:
        rngs = [None] * d.world_size
        torch.distributed.all_gather_object(rngs, rng)
    trainer_state = {"step": state.step, "scheduler": state.scheduler.state_dict(), "rng": rngs,
                     "global_batch": global_batch(cfg, d.world_size)}
    if distributed.is_sharded(d, cfg.run.strategy):  # every rank writes its shards
        return sharded_checkpoint.save(out, state.step, state.model, state.optimizer, trainer_state,
                                       cfg.run.keep_checkpoints, d.is_main)
    if d.is_main:
        checkpoint.save(out, state.step, {
            **trainer_state,
            "adapter": {k: v.detach().cpu().clone() for k, v in patch.adapter_state_dict(state.model).items()},
            "optimizer": state.optimizer.state_dict(),
        }, cfg.run.keep_checkpoints)
    distributed.barrier(d)  # a failed write on rank 0 (a full disk) ends the run there; the others stop here
    return checkpoint.path_for(out, state.step)


def _run_steps(cfg: TrainConfig, state: _State, d: distributed.Dist, order: DataOrder, examples: list,
               collate: Callable, metrics: rundir.MetricsLog | None, out: Path, watch: preempt.Watch) -> float:
    o = cfg.optim
    scaler = optim.grad_scaler(cfg.run.precision, d.device)
    bar = Progress(o.steps, state.step, enabled=cfg.run.progress and d.is_main)
    began, last_loss = time.perf_counter(), float("nan")
    while state.step < o.steps:
        t0 = time.perf_counter()
        loss_sum, tokens = 0.0, 0
        for micro in range(o.grad_accum):
            batch = collate([examples[i] for i in order.micro_batch(state.step, micro, d.rank)])
            batch = {k: v.to(d.device) for k, v in batch.items()}
            with distributed.accumulating(state.wrapped, sync=micro == o.grad_accum - 1):
                with optim.autocast(cfg.run.precision, d.device):
                    loss = state.wrapped(**batch).loss
                scaled = loss / o.grad_accum
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += loss.item()
            tokens += int(batch["attention_mask"].sum())
        loss_mean = distributed.mean_across(d, loss_sum / o.grad_accum)
        if scaler:
            scaler.unscale_(state.optimizer)
        norm = nn.utils.clip_grad_norm_(state.params, o.max_grad_norm if o.max_grad_norm else math.inf)
        if not math.isfinite(loss_mean) or (scaler is None and not math.isfinite(float(norm))):
            _diverged(cfg, state, loss_mean, float(norm), out, bar)
        if scaler:
            scaler.step(state.optimizer)
            scaler.update()
        else:
            state.optimizer.step()
        lr = state.scheduler.get_last_lr()[0]
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        last_loss = loss_mean
        dt = time.perf_counter() - t0
        tok_s = tokens * d.world_size / dt
        bar.update(loss=loss_mean, lr=lr, tok_s=tok_s)
        if metrics is not None and (state.step % cfg.run.log_every == 0 or state.step == o.steps):
            metrics.append({"step": state.step, "loss": round(loss_mean, 6), "lr": lr, "tokens_per_s": round(tok_s, 1),
                            "grad_norm": round(float(norm), 6), "epoch": round(order.epoch_of(state.step), 4),
                            "elapsed_s": round(metrics.elapsed_before + time.perf_counter() - began, 3)})
        saved = cfg.run.save_every and state.step % cfg.run.save_every == 0 and state.step < o.steps
        if saved:
            _save_checkpoint(cfg, state, d, out)
        signum = distributed.max_across(d, watch.received)  # one rank's signal stops every rank at this step
        if signum:
            bar.close()
            path = checkpoint.path_for(out, state.step, distributed.is_sharded(d, cfg.run.strategy)) if saved \
                else _save_checkpoint(cfg, state, d, out)
            raise preempt.Preempted(signum, state.step, o.steps, path)
    bar.close()
    return last_loss


def _diverged(cfg: TrainConfig, state: _State, loss: float, norm: float, out: Path, bar: Progress) -> None:
    bar.close()
    found = checkpoint.list_checkpoints(out)
    kept = f"the last good checkpoint is {found[-1][1]}" if found else "no checkpoint was written (run.save_every)"
    raise TrainingDiverged(
        f"training stopped at step {state.step + 1}: loss is {loss}, gradient norm {norm}. Nothing was saved "
        f"after the last good state; {kept}. Lower optim.lr (now {cfg.optim.lr:g}; PiSSA and DuDe start from "
        f"large principal factors and need a smaller lr than LoRA) or set optim.max_grad_norm.")


def _finish(cfg: TrainConfig, out: Path, result: TrainResult, start: float, trainable: int) -> None:
    result.wall_time_s = time.perf_counter() - start
    lines = rundir.read_lines(out / "metrics.jsonl")
    rundir.plot_losses(out / "loss.png", {cfg.adapter.method: ([r["step"] for r in lines], [r["loss"] for r in lines])},
                       f"{cfg.adapter.method} r={cfg.adapter.r}, lr={cfg.optim.lr:g}")
    tail = [r["loss"] for r in lines[-5:]]
    rundir.write_json(out / "summary.json", {
        "method": cfg.adapter.method, "steps": result.steps, "final_loss": result.final_loss,
        "final_loss_last5": sum(tail) / len(tail) if tail else None,
        "wall_time_s": round(result.wall_time_s, 2), "peak_memory_mb": round(result.peak_memory_mb, 1),
        "trainable_parameters": trainable,
    })
