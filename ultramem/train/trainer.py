"""The training loop: one code path for one device and for ``torchrun`` processes.

    ultramem train --preset tiny-dense --out runs/tiny-dense train.max_steps=200

Per optimiser step: LR schedule set on every group (:mod:`ultramem.train.optim`);
``grad_accum`` micro-batches, each ``loss = LM loss + every aux loss`` (MoE balance, Tucker,
...) divided by ``grad_accum`` (DDP syncs gradients only on the last one); grad clipping;
``optimizer.step()``; ``model.after_optimizer_step(step)`` (e.g. Tucker u/v refresh).
Data position = optimiser steps done (the sampler is stateless, :mod:`ultramem.data.loader`),
so a checkpoint's step, weights, optimiser and RNG states give an exact resume.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch

from ultramem import distributed
from ultramem.accounting import count
from ultramem.config import Config
from ultramem.data.loader import TokenBatches
from ultramem.data.prepare import load_index
from ultramem.errors import ConfigError, DataError
from ultramem.eval.loss import autocast_ctx, bits_per_byte, evaluate_loss
from ultramem.model.transformer import Transformer
from ultramem.train import checkpoint as ckpt
from ultramem.train.clip import clip_gradients
from ultramem.train.metrics import MetricsLogger, peak_flops, plot_runs, train_flops_per_token
from ultramem.train.optim import build_param_groups, make_optimizer, set_lr

# fields that may change between a checkpoint and its resume without --force (no effect on
# the numbers computed)
RESUME_SAFE = {"train.log_every", "train.eval_every", "train.eval_batches", "train.ckpt_every",
               "train.keep_last", "train.tensorboard", "train.peak_tflops", "train.checkpoint"}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in RESUME_SAFE]


def check_vocab(index: dict[str, Any], cfg: Config, where: str) -> None:
    if index["vocab_size"] > cfg.model.vocab_size:
        raise DataError(
            f"tokenizer/model vocabulary mismatch: {where} has vocab_size={index['vocab_size']} but "
            f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size={index['vocab_size']}")


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


def train(cfg: Config, out_dir: str | Path, resume: bool = True, force: bool = False,
          stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir``; resumes from its latest checkpoint when there is one.
    ``stop_after``: behave as if signalled after that many steps (tests, preemptible jobs).
    Returns the run summary (also written to ``out_dir/summary.json``)."""
    cfg.validate()
    tc, run_dir = cfg.train, Path(out_dir)
    d = distributed.init(tc.device)
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    index = load_index(cfg.data.path)
    check_vocab(index, cfg, f"dataset {cfg.data.path}")
    run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(tc.seed)
    model = Transformer.build(cfg.model, d.device)
    step, tokens_seen, optim_state = 0, 0, None
    last = ckpt.latest_checkpoint(run_dir) if resume else None
    if last is not None:
        diff = config_diff(ckpt.read_config(last), cfg.to_dict())
        if diff and not force:
            raise ConfigError(f"{run_dir} was trained with a different config; refusing to resume "
                              f"(pass --force to resume anyway, or use a new --out):\n  " + "\n  ".join(diff))
        weights, optim_state, state = ckpt.read_checkpoint(last)
        ckpt.load_model_weights(model, weights, last)  # before sharding: every rank loads it whole
        ckpt.set_rng_state(state["rng"])
        step, tokens_seen = state["step"], state["tokens_seen"]
    net = distributed.wrap(model, d, tc.parallel)  # FSDP2 swaps in sharded parameters here,
    groups = build_param_groups(model, tc)  # so the optimiser is built after wrapping
    opt = make_optimizer(groups, tc, d.device.type)
    if optim_state is not None:
        distributed.load_optimizer_state(model, opt, optim_state)
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
    seq, bsz = cfg.data.seq_len, tc.batch_size
    train_batches = TokenBatches(cfg.data.path, "train", seq, bsz, tc.seed, d.rank, d.world)
    val_batches = (TokenBatches(cfg.data.path, "val", seq, bsz, shuffle=False)
                   if index["splits"]["val"]["tokens"] > seq else None)
    counts = count(cfg.model)
    flops_tok = train_flops_per_token(cfg.model, seq)
    peak = peak_flops(d.device, tc.peak_tflops)
    tokens_per_step = bsz * seq * tc.grad_accum * d.world

    def run_eval() -> dict[str, Any]:
        if val_batches is None:
            return {}
        loss, n = evaluate_loss(model, val_batches, d.device, tc.dtype, tc.eval_batches)
        vs = index["splits"]["val"]
        return {"val_loss": loss, "val_bpb": bits_per_byte(loss, n, vs["tokens"], vs["bytes"])}

    def save() -> None:
        if not tc.checkpoint:
            return
        model_sd, optim_sd = distributed.full_state_dicts(model, opt)  # collective when sharded
        if d.is_main:
            ckpt.save_checkpoint(run_dir, step, model_sd, optim_sd, {"step": step, "tokens_seen": tokens_seen},
                                 cfg.to_dict(), tc.keep_last)
        distributed.barrier(d)

    bar = None
    if d.is_main and progress:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=tc.max_steps, initial=step, desc=run_dir.name, unit="step", dynamic_ncols=True)
    model.train()
    tok_s_ema, last_val, wall0, interrupted = None, {}, time.perf_counter(), False
    with _StopFlag() as stop:
        while step < tc.max_steps:
            t0 = time.perf_counter()
            lr = set_lr(opt, groups, step, tc)
            track = (step + 1) % tc.log_every == 0 or step == 0
            model.set_track_metrics(track)
            loss_sum, aux_sum, aux_parts, layer_metrics = _accumulate(net, train_batches, step, tc, d)
            norms = clip_gradients(groups, tc.grad_clip_mode, tc.grad_clip)  # pre-clip norms
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.after_optimizer_step(step)
            step += 1
            tokens_seen += tokens_per_step
            loss_t = distributed.all_reduce_mean(torch.tensor([loss_sum], device=d.device), d)
            loss_val = float(loss_t[0])
            dt = time.perf_counter() - t0
            tok_s = tokens_per_step / dt
            tok_s_ema = tok_s if tok_s_ema is None or step <= 2 else 0.9 * tok_s_ema + 0.1 * tok_s
            row: dict[str, Any] = {"step": step, "loss": loss_val, "lr": lr, **norms,
                                   "tokens": tokens_seen, "tokens_per_s": tok_s, "dt": dt}
            if peak:
                row["mfu"] = tok_s * flops_tok / (peak * d.world)
            if aux_parts:
                row["aux_loss"] = aux_sum
                row.update(aux_parts)
            row.update(layer_metrics)
            if (tc.eval_every and step % tc.eval_every == 0) or step == tc.max_steps:
                last_val = run_eval()
                row.update(last_val)
            logger.log(row)
            if bar is not None:
                bar.update(1)
                if track or "val_loss" in row:
                    post = {"loss": f"{loss_val:.3f}", "tok/s": f"{tok_s_ema:,.0f}"}
                    if "val_loss" in last_val:
                        post["val"] = f"{last_val['val_loss']:.3f}"
                    bar.set_postfix(post)
            stopping = stop.signum is not None or (stop_after is not None and step >= stop_after)
            if d.enabled:
                flag = torch.tensor([1.0 if stopping else 0.0], device=d.device)
                stopping = bool(distributed.all_reduce_mean(flag, d)[0] > 0)
            if (tc.ckpt_every and step % tc.ckpt_every == 0) or step == tc.max_steps or stopping:
                save()
            if stopping and step < tc.max_steps:
                interrupted = True
                break
    if bar is not None:
        bar.close()
    model.set_track_metrics(False)
    summary = {
        "run": str(run_dir), "step": step, "max_steps": tc.max_steps, "interrupted": interrupted,
        "signal": stop.signum, "params": counts.params, "active_params": counts.active_params,
        "flops_per_token": counts.flops_per_token, "train_flops_per_token": flops_tok,
        "tokens_seen": tokens_seen, "tokens_per_s": tok_s_ema, "device": _device_name(d.device),
        "world_size": d.world, "wall_s": time.perf_counter() - wall0, **last_val,
    }
    if peak and tok_s_ema:
        summary["mfu"] = tok_s_ema * flops_tok / (peak * d.world)
    if d.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if step > 0:
            plot_runs([run_dir], run_dir / "loss_curve.png", labels=[run_dir.name])
    logger.close()
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
