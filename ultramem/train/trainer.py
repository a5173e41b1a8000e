"""The training loop: one code path for one device and for ``torchrun`` processes.

    ultramem train --preset tiny-dense --out runs/tiny-dense train.max_steps=200

:func:`train` = :func:`setup` (data checks, run lock, resume or restart, model, optimiser),
then :func:`train_step` + :func:`log_step` per optimiser step, then :func:`finish` (summary,
plot). Per optimiser step: LR schedule set on every group (:mod:`ultramem.train.optim`);
``grad_accum`` micro-batches, each ``loss = LM loss + every aux loss`` (MoE balance, Tucker,
...) divided by ``grad_accum`` (DDP syncs gradients only on the last one); the global
gradient norm (clipped when ``train.grad_clip > 0``); the divergence guard
(:mod:`ultramem.train.guard`) before ``optimizer.step()``; ``model.after_optimizer_step(step)``
(e.g. Tucker u/v refresh). Data position = optimiser steps done (the sampler is stateless,
:mod:`ultramem.data.loader`), so a checkpoint's step, weights, optimiser and RNG states give an
exact resume (:mod:`ultramem.train.resume`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ultramem import checkpoint as ckpt
from ultramem import distributed
from ultramem.accounting import count
from ultramem.config import Config
from ultramem.data.index import check_vocab, dataset_identity, load_index, verify_shards
from ultramem.data.loader import TokenBatches
from ultramem.distributed import checkpoint as dckpt
from ultramem.errors import ConfigError
from ultramem.eval.loss import autocast_ctx, bits_per_byte, evaluate_loss
from ultramem.model.transformer import Transformer
from ultramem.train.clip import clip_gradients
from ultramem.train.determinism import determinism
from ultramem.train.guard import DivergenceGuard, diverged
from ultramem.train.metrics import MetricsLogger, peak_flops, plot_runs, train_flops_per_token
from ultramem.train.optim import build_param_groups, make_optimizer, set_lr
from ultramem.train.resume import check_resume, rng_state, set_rng_state
from ultramem.train.rundir import RunLock, move_aside, prepare_run_dir


class _StopFlag:
    """SIGINT/SIGTERM -> finish the current step, save a checkpoint, exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class Run:
    """Everything one training run holds between steps (built by :func:`setup`)."""

    cfg: Config
    run_dir: Path
    d: distributed.Dist
    index: dict[str, Any]
    model: Transformer
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    groups: list
    train_batches: TokenBatches
    val_batches: TokenBatches | None
    logger: MetricsLogger
    guard: DivergenceGuard
    step: int = 0
    tokens_seen: int = 0
    tokens_per_step: int = 0
    flops_tok: float = 0.0
    peak: float | None = None
    last_val: dict[str, Any] = field(default_factory=dict)
    tok_s_ema: float | None = None
    wall0: float = field(default_factory=time.perf_counter)


def train(cfg: Config, out_dir: str | Path, resume: bool = True, force: bool = False,
          stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir``; resumes from its latest checkpoint when there is one
    (``resume=False``: the previous run is moved aside first, see :mod:`ultramem.train.rundir`).
    ``stop_after``: behave as if signalled after that many steps (tests, preemptible jobs).
    Returns the run summary (also written to ``out_dir/summary.json``)."""
    cfg.validate()
    if stop_after is not None and stop_after < 1:
        raise ConfigError(f"--stop-after={stop_after}: must be >= 1")
    run_dir = Path(out_dir)
    d = distributed.init(cfg.train.device)
    if d.is_main:
        prepare_run_dir(run_dir)
    with RunLock(run_dir, enabled=d.is_main), determinism(cfg.train.deterministic, d.device):
        run = setup(cfg, run_dir, d, resume, force)
        interrupted, signum = _loop(run, stop_after, progress)
        return finish(run, interrupted, signum)


def setup(cfg: Config, run_dir: Path, d: distributed.Dist, resume: bool, force: bool) -> Run:
    """Check the data, restore or start the run, build model and optimiser."""
    tc = cfg.train
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    index = load_index(cfg.data.path)
    check_vocab(index, cfg.model.vocab_size, f"dataset {cfg.data.path}")
    if d.is_main:
        verify_shards(cfg.data.path, index)
        if not resume and (moved := move_aside(run_dir)) is not None:
            print(f"ultramem train: --restart: the previous run in {run_dir} was moved to {moved}", file=sys.stderr)
    distributed.barrier(d)

    torch.manual_seed(tc.seed)
    model = Transformer.build(cfg.model, d.device)
    last = dckpt.latest_any(run_dir) if resume else None
    state, optim_state = _restore(cfg, run_dir, last, model, index, d, force)
    net = distributed.wrap(model, d, tc.parallel, tc.memory_parallel, tc.memory_partition,  # sharded params here,
                           tc.memory_overlap)
    groups = build_param_groups(model, tc)  # so the optimiser is built after wrapping
    opt = make_optimizer(groups, tc, d.device.type)
    if optim_state is not None:
        distributed.load_optimizer_state(model, opt, optim_state)
    elif last is not None:  # a DCP checkpoint: any saved sharding into this run's
        dckpt.load(last, model, opt, verified=True)
    if state is not None:
        set_rng_state(state["rng"])
    step, tokens_seen = (state["step"], state["tokens_seen"]) if state is not None else (0, 0)
    logger = MetricsLogger(run_dir, tc.tensorboard, enabled=d.is_main)
    if d.is_main:
        if last is None and (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()
        logger.truncate_after(step)
        cfg.save(run_dir / "config.json")
        if index.get("tokenizer"):
            shutil.copyfile(Path(cfg.data.path) / index["tokenizer"], run_dir / "tokenizer.json")

    if tc.compile:
        net = torch.compile(net)
    seq, bsz, vocab = cfg.data.seq_len, tc.batch_size, cfg.model.vocab_size
    train_batches = TokenBatches(cfg.data.path, "train", seq, bsz, tc.seed, d.rank, d.world, vocab_size=vocab)
    val_batches = (TokenBatches(cfg.data.path, "val", seq, bsz, shuffle=False, vocab_size=vocab)
                   if index["splits"]["val"]["tokens"] > seq else None)
    return Run(cfg, run_dir, d, index, model, net, opt, groups, train_batches, val_batches, logger,
               DivergenceGuard(tc.spike_factor, tc.spike_window), step=step, tokens_seen=tokens_seen,
               tokens_per_step=bsz * seq * tc.grad_accum * d.world,
               flops_tok=train_flops_per_token(cfg.model, seq), peak=peak_flops(d.device, tc.peak_tflops))


def _restore(cfg: Config, run_dir: Path, last: Path | None, model: Transformer, index: dict[str, Any],
             d: distributed.Dist, force: bool) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The resume checks on checkpoint ``last`` (if any; saved at any world size); a full one's
    weights are loaded here into the unsharded model (every rank loads it whole, before
    sharding), a DCP one's after wrapping. Returns (trainer state, full optimiser state)."""
    if last is None:
        return None, None
    if dckpt.is_dcp(last):
        (state, old_cfg), weights, optim_state = dckpt.read_state(last), None, None
    else:
        weights, optim_state, state = ckpt.read_checkpoint(last)
        old_cfg = ckpt.read_config(last)
    forced = check_resume(run_dir, old_cfg or {}, cfg.to_dict(), state.get("data"), dataset_identity(index), force,
                          old_world=state.get("world"), new_world=d.world)
    if weights is not None:
        ckpt.load_model_weights(model, weights, last)
    if forced and d.is_main:
        print(f"ultramem train: --force: resuming {last} despite: " + "; ".join(forced), file=sys.stderr)
    return state, optim_state


def _loop(run: Run, stop_after: int | None, progress: bool) -> tuple[bool, int | None]:
    """Steps until ``max_steps``, a signal or ``stop_after``; returns (interrupted, signal)."""
    tc, d = run.cfg.train, run.d
    bar = None
    if d.is_main and progress:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=tc.max_steps, initial=run.step, desc=run.run_dir.name, unit="step", dynamic_ncols=True)
    run.model.train()
    interrupted = False
    try:
        with _StopFlag() as stop:
            while run.step < tc.max_steps:
                row = train_step(run)
                if (tc.eval_every and run.step % tc.eval_every == 0) or run.step == tc.max_steps:
                    run.last_val = run_eval(run)
                    row.update(run.last_val)
                log_step(run, row, bar)
                stopping = stop.signum is not None or (stop_after is not None and run.step >= stop_after)
                if d.enabled:
                    flag = torch.tensor([1.0 if stopping else 0.0], device=d.device)
                    stopping = bool(distributed.all_reduce_mean(flag, d)[0] > 0)
                if (tc.ckpt_every and run.step % tc.ckpt_every == 0) or run.step == tc.max_steps or stopping:
                    save(run)
                if stopping and run.step < tc.max_steps:
                    interrupted = True
                    break
    finally:
        if bar is not None:
            bar.close()
        run.model.set_track_metrics(False)
    return interrupted, stop.signum


def train_step(run: Run) -> dict[str, Any]:
    """One optimiser step; returns its metrics row. Raises DivergenceError (before applying
    the step) when the loss or gradient norm is not finite or the loss spikes."""
    tc, d, step = run.cfg.train, run.d, run.step
    t0 = time.perf_counter()
    lr = set_lr(run.opt, run.groups, step, tc)
    track = (step + 1) % tc.log_every == 0 or step == 0
    run.model.set_track_metrics(track)
    loss_sum, aux_sum, aux_parts, layer_metrics = _accumulate(run.net, run.train_batches, step, tc, d)
    if tc.grad_clip_mode == "global":
        # the norm is computed even unclipped (max_norm=inf): the guard needs it
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(),
                                                   tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        norms = {"grad_norm": float(grad_norm)}
        if not d.enabled:  # the per-part pre-clip norms too (measure only; the clip above is global)
            norms = {**clip_gradients(run.groups, "global", 0.0), **norms}
    else:  # dense parameters and value tables clipped apart (train/clip.py)
        norms = clip_gradients(run.groups, tc.grad_clip_mode, tc.grad_clip)
        grad_norm = norms["grad_norm"]
    loss_val = float(distributed.all_reduce_mean(torch.tensor([loss_sum], device=d.device), d)[0])
    problem = run.guard.check(loss_val, float(grad_norm))
    if problem is not None:
        run.opt.zero_grad(set_to_none=True)
        raise diverged(step + 1, problem, dckpt.latest_any(run.run_dir))
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    run.model.after_optimizer_step(step)
    run.step += 1
    run.tokens_seen += run.tokens_per_step
    dt = time.perf_counter() - t0
    tok_s = run.tokens_per_step / dt
    run.tok_s_ema = tok_s if run.tok_s_ema is None or run.step <= 2 else 0.9 * run.tok_s_ema + 0.1 * tok_s
    row: dict[str, Any] = {"step": run.step, "loss": loss_val, "lr": lr, **norms,
                           "tokens": run.tokens_seen, "tokens_per_s": tok_s, "dt": dt}
    if run.peak:
        row["mfu"] = tok_s * run.flops_tok / (run.peak * d.world)
    if aux_parts:
        row["aux_loss"] = aux_sum
        row.update(aux_parts)
    row.update(layer_metrics)
    return row


def log_step(run: Run, row: dict[str, Any], bar: Any) -> None:
    """metrics.jsonl (+ TensorBoard) and the progress bar."""
    run.logger.log(row)
    if bar is None:
        return
    bar.update(1)
    tc = run.cfg.train
    if run.step % tc.log_every == 0 or run.step == 1 or "val_loss" in row:
        post = {"loss": f"{row['loss']:.3f}", "tok/s": f"{run.tok_s_ema:,.0f}"}
        if "val_loss" in run.last_val:
            post["val"] = f"{run.last_val['val_loss']:.3f}"
        bar.set_postfix(post)


def run_eval(run: Run) -> dict[str, Any]:
    if run.val_batches is None:
        return {}
    tc = run.cfg.train
    loss, n = evaluate_loss(run.model, run.val_batches, run.d.device, tc.dtype, tc.eval_batches)
    vs = run.index["splits"]["val"]
    return {"val_loss": loss, "val_bpb": bits_per_byte(loss, n, vs["tokens"], vs["bytes"])}


def save(run: Run) -> None:
    """A checkpoint of the current step: DCP when the model is sharded (every rank writes its
    shards), else full weights (rank 0 writes); both reload at any world size."""
    tc = run.cfg.train
    if not tc.checkpoint:
        return
    state = {"step": run.step, "tokens_seen": run.tokens_seen, "rng": rng_state(),
             "data": dataset_identity(run.index), "world": run.d.world}
    if distributed.is_sharded(run.model):
        path = dckpt.save(run.run_dir, run.step, run.model, run.opt, state, tc.keep_last, run.cfg.to_dict())
    else:
        model_sd, optim_sd = distributed.full_state_dicts(run.model, run.opt)
        path = None
        if run.d.is_main:
            path = ckpt.save_checkpoint(run.run_dir, run.step, model_sd, optim_sd, state, run.cfg.to_dict(),
                                        tc.keep_last)
    if run.d.is_main:
        dckpt.prune_other_kind(run.run_dir, tc.keep_last, path)
    distributed.barrier(run.d)


def finish(run: Run, interrupted: bool, signum: int | None) -> dict[str, Any]:
    """Summary (``summary.json``) and loss plot; a rerun of a finished run (no step taken)
    re-evaluates and keeps the previous throughput figures."""
    tc, d, counts = run.cfg.train, run.d, count(run.cfg.model)
    if not run.last_val and run.step == tc.max_steps and run.step > 0:
        run.last_val = run_eval(run)
    summary = {
        "run": str(run.run_dir), "step": run.step, "max_steps": tc.max_steps, "interrupted": interrupted,
        "signal": signum, "params": counts.params, "active_params": counts.active_params,
        "flops_per_token": counts.flops_per_token, "train_flops_per_token": run.flops_tok,
        "tokens_seen": run.tokens_seen, "tokens_per_s": run.tok_s_ema, "device": _device_name(d.device),
        "world_size": d.world, "wall_s": time.perf_counter() - run.wall0, **run.last_val,
    }
    if run.peak and run.tok_s_ema:
        summary["mfu"] = run.tok_s_ema * run.flops_tok / (run.peak * d.world)
    if d.is_main:
        path = run.run_dir / "summary.json"
        if run.tok_s_ema is None and path.is_file():  # no step ran: keep the measured figures
            with contextlib.suppress(ValueError, OSError):
                prev = json.loads(path.read_text())
                for k in ("tokens_per_s", "mfu", "wall_s"):
                    if k in prev:
                        summary[k] = prev[k]
        path.write_text(json.dumps(summary, indent=2) + "\n")
        if run.step > 0:
            plot_runs([run.run_dir], run.run_dir / "loss_curve.png", labels=[run.run_dir.name])
    run.logger.close()
    distributed.shutdown(d)
    return summary


def _accumulate(net: torch.nn.Module, batches: TokenBatches, step: int, tc: Any,
                d: distributed.Dist) -> tuple[float, float, dict[str, float], dict[str, float]]:
    """Forward/backward of the ``grad_accum`` micro-batches of optimiser step ``step``:
    ``loss = LM loss + aux losses``, scaled by 1/grad_accum; DDP syncs on the last one only.
    Returns (LM loss, aux loss, each aux loss, memory-layer metrics), averaged."""
    loss_sum, aux_sum, aux_parts, layer_metrics = 0.0, 0.0, {}, {}
    for micro in range(tc.grad_accum):
        x, y = batches.batch(step * tc.grad_accum + micro)
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        sync = micro == tc.grad_accum - 1 or not hasattr(net, "no_sync")
        with (contextlib.nullcontext() if sync else net.no_sync()), autocast_ctx(d.device, tc.dtype):
            out = net(x, y)
            loss = out.loss + out.aux_loss if out.aux_loss is not None else out.loss
        (loss / tc.grad_accum).backward()
        loss_sum += float(out.loss.detach()) / tc.grad_accum
        if out.aux_loss is not None:
            aux_sum += float(out.aux_loss.detach()) / tc.grad_accum
            for k, v in out.aux_losses.items():
                aux_parts[f"aux/{k}"] = aux_parts.get(f"aux/{k}", 0.0) + float(v.detach()) / tc.grad_accum
        layer_metrics.update({f"mem/{k}": v for k, v in out.metrics.items()})
    return loss_sum, aux_sum, aux_parts, layer_metrics


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
