"""Probe of the costs that bound a decode-sized memory layer on the GPU (exploration, not a
benchmark of the library's ops): what one node of a CUDA graph costs, whether programmatic
dependent launch (PDL) survives graph capture and what it saves, and how fast the small-batch
projections of the UltraMem-1.6B-x12 layer run with cuBLAS against a plain Triton GEMV, with
the weights warm in L2 (graph replay of the same call) and cold (an L2 flush between calls).

    PYTHONPATH=. python3 benchmarks/explore/decode_probe.py --out $OUT   # -> decode-probe-<device>.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # benchmarks/_bench.py
from _bench import graph_time, warm_up  # noqa: E402

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_wait = gdc_launch_dependents = None

DEV, BF16 = "cuda", torch.bfloat16
ROWS: list[dict] = []


def rec(what: str, **kw) -> None:
    ROWS.append({"what": what, **kw})
    print(what, kw, flush=True)


@triton.jit
def _touch(x_ptr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    v = tl.load(x_ptr)
    tl.store(x_ptr, v + 1.0)


@triton.jit
def _spin(x_ptr, ITERS: tl.constexpr, PDL: tl.constexpr):
    """A latency-bound kernel (a serial dependent chain on 2 programs), as a retrieval is."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    v = tl.load(x_ptr + tl.program_id(0))
    for _ in range(ITERS):
        v = v * 1.0000001 + 1e-7
    tl.store(x_ptr + tl.program_id(0), v)


@triton.jit
def _gemv(x_ptr, w_ptr, y_ptr, B, N, K, BB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          SPLIT: tl.constexpr, PDL: tl.constexpr, PRE: tl.constexpr):
    """y[b, n] (+)= sum_k x[b, k] w[n, k]; program (n tile, K split). PRE: with PDL, load the
    whole weight slice before waiting on the previous kernel (needs BN * K / SPLIT in registers)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rb = tl.arange(0, BB)
    kper = K // SPLIT
    k_lo = pid_k * kper
    acc = tl.zeros([BB, BN], dtype=tl.float32)
    if PRE:
        rk = k_lo + tl.arange(0, PRE)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :])  # [BN, kper]
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        xk = tl.load(x_ptr + rb[:, None] * K + rk[None, :], mask=rb[:, None] < B, other=0.0)
        if BB >= 16:
            acc += tl.dot(xk, tl.trans(w))
        else:
            acc += tl.sum(xk.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    else:
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        for k0 in range(k_lo, k_lo + kper, BK):
            rk = k0 + tl.arange(0, BK)
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :])
            xk = tl.load(x_ptr + rb[:, None] * K + rk[None, :], mask=rb[:, None] < B, other=0.0)
            if BB >= 16:
                acc += tl.dot(xk, tl.trans(w))
            else:
                acc += tl.sum(xk.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    ptr = y_ptr + rb[:, None] * N + rn[None, :]
    if SPLIT == 1:
        tl.store(ptr, acc.to(y_ptr.dtype.element_ty), mask=rb[:, None] < B)
    else:
        tl.atomic_add(ptr, acc, mask=rb[:, None] < B, sem="relaxed")


@triton.jit
def _gemv_sk(x_ptr, w_ptr, y_ptr, part_ptr, cnt_ptr, B, N, K, BB: tl.constexpr, BN: tl.constexpr,
             BK: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr, PF: tl.constexpr,
             ACC2: tl.constexpr = False):
    """Split-K GEMV without a zero-fill: each program writes its fp32 partial, the last of an n
    tile's SPLIT programs (an acq_rel counter, reset by it) sums them and writes y."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rb = tl.arange(0, BB)
    kper = K // SPLIT
    k_lo = pid_k * kper
    acc = tl.zeros([BB, BN], dtype=tl.float32)
    acc2 = tl.zeros([BN, BK], dtype=tl.float32)  # ACC2 (B = 1): elementwise, reduced once
    rk = k_lo + tl.arange(0, BK)
    w = tl.load(w_ptr + rn[:, None] * K + rk[None, :])
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    for k0 in range(k_lo, k_lo + kper, BK):
        rk = k0 + tl.arange(0, BK)
        if PF:
            nk = tl.minimum(k0 + BK, k_lo + kper - BK) + tl.arange(0, BK)
            w_next = tl.load(w_ptr + rn[:, None] * K + nk[None, :])
        xk = tl.load(x_ptr + rb[:, None] * K + rk[None, :], mask=rb[:, None] < B, other=0.0)
        if ACC2:
            acc2 += xk.to(tl.float32) * w.to(tl.float32)
        elif BB >= 16:
            acc += tl.dot(xk, tl.trans(w))
        else:
            acc += tl.sum(xk.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        if PF:
            w = w_next
        else:
            nk = tl.minimum(k0 + BK, k_lo + kper - BK) + tl.arange(0, BK)
            w = tl.load(w_ptr + rn[:, None] * K + nk[None, :])
    if ACC2:
        acc += tl.sum(acc2, axis=1)[None, :]
    bmask = rb[:, None] < B
    if SPLIT == 1:
        tl.store(y_ptr + rb[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=bmask)
    else:
        tl.store(part_ptr + (pid_k * BB + rb[:, None]) * N + rn[None, :], acc, mask=bmask)
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if done == SPLIT - 1:
            tot = tl.zeros([BB, BN], dtype=tl.float32)
            for s in range(SPLIT):
                tot += tl.load(part_ptr + (s * BB + rb[:, None]) * N + rn[None, :], mask=bmask,
                               other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + rb[:, None] * N + rn[None, :], tot.to(y_ptr.dtype.element_ty), mask=bmask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


def gemv_sk(x, w, y, bn, bk, split, warps, pdl=False, pf=False, scratch=None, acc2=False):
    b, k = x.shape
    n = w.shape[0]
    bb = max(triton.next_power_of_2(b), 16 if b > 8 else 1)
    part, cnt = scratch
    kw = {"launch_pdl": True} if pdl else {}
    _gemv_sk[(n // bn, split)](x, w, y, part, cnt, b, n, k, BB=bb, BN=bn, BK=bk, SPLIT=split,
                               PDL=pdl, PF=pf, ACC2=acc2, num_warps=warps, **kw)


def gemv(x, w, y, bn, bk, split, warps, pdl=False, pre=False):
    b, k = x.shape
    n = w.shape[0]
    bb = max(triton.next_power_of_2(b), 16 if b > 8 else 1)
    kw = {"launch_pdl": True} if pdl else {}
    _gemv[(n // bn, split)](x, w, y, b, n, k, BB=bb, BN=bn, BK=bk, SPLIT=split, PDL=pdl,
                            PRE=(k // split) if pre else 0, num_warps=warps, **kw)


def cold_time(fn, flush_bytes=256 << 20, calls=10):
    """Per-call ms with an L2 flush (a 256 MB write) before every call, minus the flush alone."""
    buf = torch.empty(flush_bytes // 4, device=DEV, dtype=torch.float32)

    def both():
        buf.zero_()
        fn()

    return graph_time(both, calls=calls) - graph_time(lambda: buf.zero_(), calls=calls)


def probe_nodes():
    x = torch.zeros(8, device=DEV)
    for pdl in (False, True):
        kw = {"launch_pdl": True} if pdl else {}
        for n in (1, 10):
            def chain(n=n, kw=kw, pdl=pdl):
                for _ in range(n):
                    _touch[(1,)](x, PDL=pdl, num_warps=1, **kw)
            us = graph_time(chain) * 1e3
            rec("graph chain of tiny kernels", pdl=pdl, kernels=n, us=us, us_per_kernel=us / n)
    before = x.clone()
    _touch[(1,)](x, PDL=True, num_warps=1, launch_pdl=True)
    torch.cuda.synchronize()
    rec("pdl launch result check", ok=bool((x - before)[0].eq(1)))


def probe_gemv():
    torch.manual_seed(0)
    shapes = {"q proj 896x2048": (896, 2048), "out proj 2048x4096": (2048, 4096)}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device=DEV, dtype=BF16) * k**-0.5
        for b in (1, 64):
            x = torch.randn(b, k, device=DEV, dtype=BF16)
            ref = F.linear(x, w).float()
            mb = w.numel() * 2 / 1e6
            for mode, timer in (("warm", lambda f: graph_time(f)), ("cold", cold_time)):
                ms = timer(lambda x=x, w=w: F.linear(x, w))
                rec("gemv", shape=name, B=b, impl="cublas", l2=mode, us=ms * 1e3, GBps=mb / ms)
            bb = max(triton.next_power_of_2(b), 16 if b > 8 else 1)
            if b == 1:
                cfgs = [(bn, bk, sp, wp, pf) for bn in (2, 4, 8, 16) for bk in (256, 512, 1024)
                        for sp in (1, 2, 4, 8) for wp in (4,) for pf in (1, 2)
                        if n % bn == 0 and k % (sp * bk) == 0 and bn * bk <= 8192
                        and n // bn * sp >= 256 and bn * bk >= 32 * wp * 8]
            else:
                cfgs = [(bn, bk, sp, wp, 1) for bn in (16, 32, 64) for bk in (64, 128, 256)
                        for sp in (1, 2, 4) for wp in (4, 8)
                        if n % bn == 0 and k % (sp * bk) == 0 and n // bn * sp >= 132]
            for bn, bk, split, warps, pf in cfgs:
                y = torch.zeros(b, n, device=DEV, dtype=BF16)
                scratch = (torch.zeros(split, bb, n, device=DEV), torch.zeros(n // bn, device=DEV, dtype=torch.int32))

                def run(x=x, w=w, y=y, bn=bn, bk=bk, split=split, warps=warps, pf=pf, scratch=scratch):
                    gemv_sk(x, w, y, bn, bk, split, warps, pf=pf == 1, scratch=scratch, acc2=pf == 2)
                try:
                    run()
                    run()
                    torch.cuda.synchronize()
                    err = (y.float() - ref).abs().max().item()
                    ms = graph_time(run, calls=20, reps=15)
                except Exception as e:  # noqa: BLE001
                    rec("gemv", shape=name, B=b, impl=f"sk bn{bn} bk{bk} split{split} w{warps} pf{int(pf)}",
                        error=repr(e)[:200])
                    continue
                rec("gemv", shape=name, B=b, impl=f"sk bn{bn} bk{bk} split{split} w{warps} pf{int(pf)}",
                    l2="warm", us=ms * 1e3, GBps=mb / ms, max_err=err, cfg=[bn, bk, split, warps, int(pf)])
            # the 6 fastest warm configs, cold
            mine = sorted((r for r in ROWS if r.get("shape") == name and r.get("B") == b
                           and r.get("impl", "").startswith("sk") and "us" in r), key=lambda r: r["us"])[:6]
            for r in mine:
                bn, bk, split, warps, pf = r["cfg"]
                y = torch.zeros(b, n, device=DEV, dtype=BF16)
                scratch = (torch.zeros(split, bb, n, device=DEV), torch.zeros(n // bn, device=DEV, dtype=torch.int32))
                ms = cold_time(lambda x=x, w=w, y=y, bn=bn, bk=bk, split=split, warps=warps, pf=pf, scratch=scratch:
                               gemv_sk(x, w, y, bn, bk, split, warps, pf=pf == 1, scratch=scratch, acc2=pf == 2))
                rec("gemv", shape=name, B=b, impl=r["impl"], l2="cold", us=ms * 1e3, GBps=mb / ms)


def probe_pdl_prologue():
    """spin (2 programs, ~10 us) -> out-proj GEMV: plain, PDL, PDL with the weights preloaded."""
    n, k = 2048, 4096
    w = torch.randn(n, k, device=DEV, dtype=BF16) * k**-0.5
    s = torch.zeros(2, device=DEV)
    for b in (1, 16):
        x = torch.randn(b, k, device=DEV, dtype=BF16)
        ref = F.linear(x, w).float()
        for label, pdl, pre, bn, split, warps in (("plain", False, False, 16, 1, 4),
                                                  ("pdl", True, False, 16, 1, 4),
                                                  ("pdl+preload", True, True, 16, 8, 4),
                                                  ("preload no pdl", False, True, 16, 8, 4),
                                                  ("pdl+preload bn8", True, True, 8, 8, 4)):
            y = torch.zeros(b, n, device=DEV, dtype=torch.float32 if split > 1 else BF16)

            def run(label=label, pdl=pdl, pre=pre, bn=bn, split=split, warps=warps, x=x, y=y):
                if split > 1:
                    y.zero_()
                _spin[(2,)](s, ITERS=2000, PDL=False, num_warps=1)
                gemv(x, w, y, bn, 512, split, warps, pdl=pdl, pre=pre)
            try:
                run()
                torch.cuda.synchronize()
                err = (y.float() - ref).abs().max().item()
                spin_only = graph_time(lambda: _spin[(2,)](s, ITERS=2000, PDL=False, num_warps=1))
                for mode, timer in (("warm", lambda f: graph_time(f)), ("cold", cold_time)):
                    ms = timer(run)
                    rec("spin then gemv", B=b, variant=label, l2=mode, us=ms * 1e3,
                        spin_alone_us=spin_only * 1e3, max_err=err)
            except Exception as e:  # noqa: BLE001
                rec("spin then gemv", B=b, variant=label, error=repr(e)[:300])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--only", default="nodes,gemv,pdl_prologue", help="comma list of probes")
    opts = ap.parse_args()
    warm_up(2.0)
    for fn in (probe_nodes, probe_gemv, probe_pdl_prologue):
        if fn.__name__.removeprefix("probe_") not in opts.only.split(","):
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            rec(fn.__name__, error=repr(e)[:500])
    device = torch.cuda.get_device_name()
    slug = "h200" if "H200" in device else "h100" if "H100" in device else "gpu"
    out = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
           "command": "PYTHONPATH=. python3 benchmarks/explore/decode_probe.py --out $OUT", "rows": ROWS}
    with open(os.path.join(opts.out, f"decode-probe-{slug}.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
