"""The multi-process side of tests/distributed: ``python workers.py SCENARIO RANK WORLD STORE TMP ARGS...``.

Every scenario asserts inside the workers (a failing rank exits non-zero with the traceback);
the helpers below are imported by the in-process side of the tests too."""

from __future__ import annotations

import copy
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ultramem.config import Config
from ultramem.distributed import checkpoint as dckpt
from ultramem.distributed.comm import record_comm
from ultramem.distributed.parallelize import make_mesh, parallelize
from ultramem.distributed.sharded_lookup import ShardedLookup
from ultramem.distributed.volume import LookupShape, columnwise_bytes, rowwise_bytes
from ultramem.model.transformer import Transformer
from ultramem.ops.lookup_reduce import lookup_reduce
from ultramem.presets import get_preset
from ultramem.train.optim import build_param_groups, make_optimizer, set_lr

SEQ, ROWS = 16, 2  # tokens per sequence, sequences per rank
TOL = {"rtol": 1e-4, "atol": 1e-5}


# Presets with a memory switch changed. PKM's default BatchNorm query norm normalises with each
# rank's own batch statistics under data parallelism (DDP too), so no multi-process run equals
# one process with it; the table sharding is compared with LayerNorm queries.
VARIANTS = {"tiny-pkm-layernorm": ("tiny-pkm", {"query_norm": "layernorm"})}


# ---- shared with the in-process tests ---------------------------------------------------------
def build(preset: str) -> tuple[Config, Transformer]:
    preset, memory = VARIANTS.get(preset, (preset, {}))
    cfg = get_preset(preset)
    for k, v in memory.items():
        setattr(cfg.model.memory, k, v)
    cfg.train.max_steps, cfg.train.warmup_frac = 8, 0.25
    torch.manual_seed(0)
    return cfg, Transformer.build(cfg.model)


def batch(cfg: Config, step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: ``world * ROWS`` sequences (rank r takes rows r*ROWS..)."""
    g = torch.Generator().manual_seed(100 + step)
    xy = torch.randint(0, cfg.model.vocab_size, (2, world * ROWS, SEQ), generator=g)
    return xy[0], xy[1]


def rows(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x[rank * ROWS:(rank + 1) * ROWS]


def optimizer(cfg: Config, model: torch.nn.Module):
    """The trainer's AdamW groups, with ``eps = 1e-5``: a gradient entry near 0 whose fp32
    summation order differs between one process and several can flip sign, and Adam's first
    steps turn any sign into a full ``lr``-sized update (``g / (|g| + eps)``), so with the
    default 1e-8 two correct runs drift apart by more than the comparison tolerance."""
    groups = build_param_groups(model, cfg.train)
    opt = make_optimizer(groups, cfg.train, "cpu")
    for pg in opt.param_groups:
        pg["eps"] = 1e-5
    return groups, opt


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def train_step(cfg: Config, model, groups, opt, step: int, x, y) -> float:
    """One optimiser step as the trainer takes it (LR groups, aux losses, clipping); returns the
    LM loss averaged over the ranks."""
    set_lr(opt, groups, step, cfg.train)
    out = model(x, y)
    total_loss(out).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.after_optimizer_step(step)
    return float(mean_over_ranks(out.loss.detach()))


def full_logits(model, x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Logits of the global batch ``x`` (each rank computes its rows, gathered)."""
    with torch.no_grad():
        mine = model(rows(x, rank) if world > 1 else x).logits
    if world == 1:
        return mine
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine.contiguous())
    return torch.cat(parts)


def total_loss(out) -> torch.Tensor:
    return out.loss + out.aux_loss if out.aux_loss is not None else out.loss


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ---- scenarios --------------------------------------------------------------------------------
def scenario_op(rank: int, world: int, tmp: Path, *args: str) -> None:
    """ShardedLookup against lookup_reduce on the gathered inputs: outputs, every gradient and
    the bytes of each collective (against the formulas), both partitions, UltraMem-like
    (IVE blocks, 2 cores) and V2-like (pre-values, gelu) calls."""
    m, group = world, dist.group.WORLD
    for partition in ("row", "col"):
        for kind in ("ultramem", "v2"):
            g = torch.Generator().manual_seed(7)
            p_rows, dv, t, n, hc = 16 * m, 8 * m, 5, 6, 2
            e, dp = (4, 0) if kind == "ultramem" else (1, 4 * m)
            v = torch.randn(p_rows, dv, generator=g)
            u = torch.randn(p_rows, dp, generator=g) if dp else None
            idx = torch.randint(0, p_rows, (m, t, n), generator=g)
            sc = torch.randn(m, t, n, hc, generator=g)
            blk = torch.randint(0, e, (m, t, n), generator=g) if e > 1 else None
            pq = torch.randn(m, t, dp, generator=g) if dp else None
            up = torch.randn(m, t, e, dv, generator=g)
            act = "gelu" if dp else "identity"

            ref = [x.clone().requires_grad_() if x is not None else None for x in (v, u, sc, pq)]
            out_ref = lookup_reduce(ref[0], idx.view(m * t, n), ref[2].view(m * t, n, hc),
                                    blk.view(m * t, n) if blk is not None else None, e, ref[1],
                                    ref[3].view(m * t, dp) if dp else None, act, impl="torch")
            (out_ref * up.view(m * t, e, dv)).sum().backward()

            def shard(x, ref_x=None, r=rank, partition=partition):
                if x is None:
                    return None
                k = x.shape[0] // m if partition == "row" else x.shape[1] // m
                return (x[r * k:(r + 1) * k] if partition == "row" else x[:, r * k:(r + 1) * k])

            v_loc = shard(v).clone().requires_grad_()
            u_loc = shard(u).clone().requires_grad_() if dp else None
            s_loc = sc[rank].clone().requires_grad_()
            pq_loc = pq[rank].clone().requires_grad_() if dp else None
            with record_comm() as log:
                out = ShardedLookup(partition, group)(v_loc, idx[rank], s_loc, blk[rank] if blk is not None else None,
                                                      e, u_loc, pq_loc, act)
                (out * up[rank]).sum().backward()
            where = f"{partition}/{kind}"
            torch.testing.assert_close(out, out_ref.view(m, t, e, dv)[rank], **TOL, msg=where)
            torch.testing.assert_close(v_loc.grad, shard(ref[0].grad), **TOL, msg=f"{where} d values")
            torch.testing.assert_close(s_loc.grad, ref[2].grad[rank], **TOL, msg=f"{where} d scores")
            if dp:
                torch.testing.assert_close(u_loc.grad, shard(ref[1].grad), **TOL, msg=f"{where} d pre_values")
                torch.testing.assert_close(pq_loc.grad, ref[3].grad[rank], **TOL, msg=f"{where} d pre_query")

            shape = LookupShape(t, n, hc, e, dv, dp, 4)
            if partition == "row":
                owner = idx // (p_rows // m)
                sent = int((owner[rank] != rank).sum())
                received = int(sum((owner[r] == rank).sum() for r in range(m) if r != rank))
                want = rowwise_bytes(shape, m, sent, received)
            else:
                want = columnwise_bytes(shape, m)
            got = dict(log.bytes)
            assert set(got) == set(want), f"{where}: collectives {sorted(got)} vs formulas {sorted(want)}"
            for key in want:
                assert abs(got[key] - want[key]) < 1e-6, f"{where} {key}: {got[key]} bytes, formula {want[key]}"


def first_step_matches(preset: str, partition: str, mesh, rank: int, world: int):
    """parallelize() ``preset`` with ``partition`` on ``mesh``: logits, loss and every gradient of
    one step equal one process on the global batch. Returns (config, reference, sharded model),
    gradients cleared."""
    cfg, ref = build(preset)
    model = copy.deepcopy(ref)
    plan = parallelize(model, mesh, partition=partition)
    assert set(plan.partitions().values()) == {partition}, plan.partitions()
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415

    assert all(isinstance(b, FSDPModule) for b in model.blocks), "FSDP units: model.blocks[i]"
    where = f"{preset}/{partition}/mp={mesh['mp'].size()}"
    x, y = batch(cfg, 0, world)
    out_ref = ref(x, y)
    total_loss(out_ref).backward()
    out = model(rows(x, rank), rows(y, rank))
    total_loss(out).backward()
    torch.testing.assert_close(out.logits, rows(out_ref.logits, rank), **TOL, msg=where)
    torch.testing.assert_close(mean_over_ranks(out.loss), out_ref.loss.detach(), **TOL, msg=where)
    named = dict(model.named_parameters())
    assert set(named) == {n for n, _ in ref.named_parameters()}, where
    for name, p in ref.named_parameters():
        torch.testing.assert_close(_full(named[name].grad), p.grad, rtol=1e-4, atol=1e-6, msg=f"{where} grad {name}")
    ref.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    return cfg, ref, model


def scenario_model(rank: int, world: int, tmp: Path, mp: str, *presets: str) -> None:
    """parallelize() on ``presets`` (default: the tiny UltraMem and V2), both partitions: logits,
    loss and every gradient of the first step equal one process on the global batch; then five
    steps give the same losses."""
    mesh = make_mesh(int(mp))
    for preset in presets or ("tiny-ultramem", "tiny-ultramem-v2"):
        for partition in ("row", "col"):
            cfg, ref, model = first_step_matches(preset, partition, mesh, rank, world)
            where = f"{preset}/{partition}/mp={mp}"
            (g1, o1), (g2, o2) = optimizer(cfg, ref), optimizer(cfg, model)
            for step in range(5):
                x, y = batch(cfg, step, world)
                a = train_step(cfg, ref, g1, o1, step, x, y)
                b = train_step(cfg, model, g2, o2, step, rows(x, rank), rows(y, rank))
                assert abs(a - b) < 2e-5, f"{where} step {step}: loss {b} vs one process {a}"
            named = dict(model.named_parameters())
            for name, p in ref.named_parameters():
                torch.testing.assert_close(_full(named[name].detach()), p.detach(), rtol=1e-4, atol=1e-5,
                                           msg=f"{where} weight {name} after 5 steps")


def scenario_quad(rank: int, world: int, tmp: Path) -> None:
    """The 4-process checks of the default suite, in one process group: the op (outputs, every
    gradient, bytes = formulas; both partitions, both call kinds), the first step of each preset
    on the 2 x 2 mesh (UltraMem row-wise, V2's shared pool column-wise), and a reshard: a
    checkpoint saved on the 2 x 2 mesh (pool column-wise over 2 ranks) loads into a pool split
    row-wise over all four with the same logits; rank 0 writes them for the one-process side."""
    scenario_op(rank, world, tmp)
    mesh = make_mesh(2)
    first_step_matches("tiny-ultramem", "row", mesh, rank, world)
    cfg, _, model = first_step_matches("tiny-ultramem-v2", "col", mesh, rank, world)
    groups, opt = optimizer(cfg, model)
    x, y = batch(cfg, 0, world)
    train_step(cfg, model, groups, opt, 0, rows(x, rank), rows(y, rank))
    dckpt.save(tmp / "run", 1, model, opt, {"tokens": 7})
    logits = full_logits(model, batch(cfg, 99, world)[0], rank, world)
    _, other = build("tiny-ultramem-v2")
    parallelize(other, make_mesh(4), partition="row")
    assert dckpt.load(dckpt.latest_checkpoint(tmp / "run"), other)["tokens"] == 7
    torch.testing.assert_close(full_logits(other, batch(cfg, 99, world)[0], rank, world), logits, **TOL)
    if rank == 0:
        torch.save({"logits": logits}, tmp / "expect.pt")


def scenario_save(rank: int, world: int, tmp: Path, preset: str, mp: str, partition: str) -> None:
    """Train two steps sharded, save at step 2; rank 0 writes the expected logits and the
    losses of the next two steps (after the save) for the single-process side to compare."""
    cfg, model = build(preset)
    parallelize(model, make_mesh(int(mp)), partition=partition)
    groups, opt = optimizer(cfg, model)
    for step in range(2):
        x, y = batch(cfg, step, world)
        train_step(cfg, model, groups, opt, step, rows(x, rank), rows(y, rank))
    dckpt.save(tmp / "run", 2, model, opt, {"tokens": 123})
    expect = {"logits": full_logits(model, batch(cfg, 99, world)[0], rank, world), "losses": []}
    for step in (2, 3):
        x, y = batch(cfg, step, world)
        expect["losses"].append(train_step(cfg, model, groups, opt, step, rows(x, rank), rows(y, rank)))
    if rank == 0:
        torch.save(expect, tmp / "expect.pt")


def scenario_load(rank: int, world: int, tmp: Path, preset: str, mp: str, partition: str) -> None:
    """Load the single-process checkpoint ``tmp/run`` into a sharded model: same logits, same
    losses for the next two steps as the single process (``tmp/expect.pt``)."""
    cfg, model = build(preset)
    parallelize(model, make_mesh(int(mp)), partition=partition)
    groups, opt = optimizer(cfg, model)
    state = dckpt.load(dckpt.latest_checkpoint(tmp / "run"), model, opt)
    assert state["step"] == 2 and state["tokens"] == 123, state
    expect = torch.load(tmp / "expect.pt")
    torch.testing.assert_close(full_logits(model, batch(cfg, 99, world)[0], rank, world), expect["logits"], **TOL)
    for step, want in zip((2, 3), expect["losses"]):
        x, y = batch(cfg, step, world)
        got = train_step(cfg, model, groups, opt, step, rows(x, rank), rows(y, rank))
        assert abs(got - want) < 1e-4, f"step {step}: loss {got} vs {want}"


def scenario_kill(rank: int, world: int, tmp: Path, preset: str, mp: str) -> None:
    """Save step 1; rank 1 dies while writing step 2 (after part of its shard file)."""
    cfg, model = build(preset)
    parallelize(model, make_mesh(int(mp)), partition="row")
    groups, opt = optimizer(cfg, model)
    x, y = batch(cfg, 0, world)
    train_step(cfg, model, groups, opt, 0, rows(x, rank), rows(y, rank))
    dckpt.save(tmp / "run", 1, model, opt)
    logits = full_logits(model, batch(cfg, 99, world)[0], rank, world)
    if rank == 0:
        torch.save({"logits": logits}, tmp / "expect.pt")
    x, y = batch(cfg, 1, world)
    train_step(cfg, model, groups, opt, 1, rows(x, rank), rows(y, rank))
    if rank == 1:
        def die(tmp_dir: Path, sd: dict) -> None:
            (tmp_dir / "__1_0.distcp").write_bytes(b"\0" * 1000)  # a partly written shard
            os._exit(3)

        dckpt._write_shards = die
    dckpt.save(tmp / "run", 2, model, opt)  # rank 0 fails or hangs in the collective
    raise AssertionError("the save of step 2 completed although rank 1 died")


def main() -> None:
    scenario, rank, world, store, tmp, *args = sys.argv[1:]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        globals()[f"scenario_{scenario}"](rank, world, Path(tmp), *args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
