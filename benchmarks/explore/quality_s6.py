"""Session 6's quality results (issue 13): rows and sections added to docs/results/quality.json,
and the figures quality-v2-diagnosis.png, quality-scaling.png, quality-overtake.png.

    python benchmarks/explore/quality_families.py   # rebuilds quality.json, then calls add_session6

Inputs: docs/results/quality/s6-*-h200.json, the runner's results.json of the two GPU calls of
``benchmarks/explore/quality_gpu_s6.sh`` (ROUND=1, ROUND=2), the causality JSON, and the
overtaking pair finished in the lead's last call (``benchmarks/explore/final_s6_gpu.sh``:
``s6-overtake2-h200.json``, UltraMem and its dense host to step 2000).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RES = ROOT / "docs" / "results"
Q = RES / "quality"
GPU = "PYTHONPATH=$PWD ROUND={r} STOP={s} OUT=out bash benchmarks/explore/quality_gpu_s6.sh"
CMD = {
    "v2d-call1": "ultramem experiment v2-diagnosis --out runs/v2d --jobs 7 data.path=data/code",
    "v2d-call2": "ultramem experiment v2-diagnosis --out runs/v2d --jobs 4 --only ultramem ultramem-v2 "
                 "ultramem-value-lr-1 ultramem-v2-value-lr-10 data.path=data/code",
    "scaling": "ultramem experiment sparse-scaling --out runs/scaling --jobs 6 data.path=data/code",
    "v1-extra": "ultramem experiment v1-family --out runs/v1 --jobs 2 --only dense-flops ultramem-tucker-per-head "
                "data.path=data/code",
    "overtake": "ultramem experiment overtake --out runs/overtake --jobs 3 data.path=data/code",
    "overtake2": "ultramem experiment overtake --out runs/overtake --jobs 2 --only ultramem dense data.path=data/code",
}
# train/val overlap, printed by quality_overlap.py's coverage pass in both calls (the JSON's
# final pass was cut by the calls' deadlines; identical figures in both calls)
OVERLAP = {"command": "python benchmarks/explore/quality_overlap.py --data data/code --out overlap.json",
           "slice_targets": 131072,
           "covered": {"8": {"full": 0.39614072713968007, "slice": 0.4629058837890625},
                       "16": {"full": 0.2430006525136952, "slice": 0.317657470703125}},
           "meaning": "fraction of validation target tokens whose n-gram ending at them occurs in the "
                      "training stream; 'slice' = the first 131,072 targets, which train.eval_batches=8 "
                      "scores (96 torch files), 'full' = all 1,185,792"}


def load(name: str) -> dict:
    return json.loads((Q / f"s6-{name}-h200.json").read_text())


def rows(res: dict, family: str, key: str) -> list[dict]:
    out = []
    for r in res["runs"]:
        if r["status"] == "pending":
            continue
        out.append({
            "model": r["name"], "preset": r["preset"], "family": family, "overrides": r.get("overrides", []),
            "status": r["status"], "params": r["params"], "active_params": r["active_params"],
            "flops_per_token": r["flops_per_token"], "tokens": r.get("tokens"), "step": r.get("step"),
            "val_loss": r.get("val_loss"), "val_loss_full": r.get("val_loss_full"),
            "val_loss_english": r.get("val_loss_english"), "tokens_per_s": r.get("tokens_per_s"),
            "probes": {k: {"acc": v["acc"], "ci95": v["ci95"], "n": v["n"]} for k, v in (r.get("probes") or {}).items()},
            "val_curve": r.get("val_curve", {}), "val_loss_by_position": r.get("val_loss_by_position"),
            "command": CMD[key], "session": 6,
        })
    return out


def _curve(ax, r: dict, **kw) -> None:
    c = {int(k): v for k, v in r["val_curve"].items()}
    ax.plot(list(c), list(c.values()), marker="o", ms=2.5, **kw)


def fig_v2(a: list[dict], b: list[dict], path: Path) -> None:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for r in a:
        _curve(ax, r, label=f"{r['model']} (call 1)")
    for r in b:
        _curve(ax, r, ls="--", label=f"{r['model']} (call 2)")
    ax.set_xlabel("step (16 x 1024 tokens)")
    ax.set_ylabel("validation loss, curve slice (nats/token)")
    ax.set_ylim(2.9, 6.0)
    ax.set_title("V2 family and the UltraMem recipe ablations (runs stopped at the call's deadline)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2)
    ref = next(r for r in a if r["model"] == "moe-8of64")["val_loss_by_position"]
    for r in a:
        if r["model"] in ("ultramem", "memory-plus", "ultramem-v2", "ultramem-value-lr-1") and r["val_loss_by_position"]:
            bins = list(r["val_loss_by_position"])
            ax2.plot(range(len(bins)), [r["val_loss_by_position"][k] - ref[k] for k in bins], marker="o",
                     label=f"{r['model']} (step {r['step']})")
    ax2.set_xticks(range(len(ref)), list(ref), rotation=45, fontsize=7)
    ax2.axhline(0, color="k", lw=0.5)
    ax2.set_xlabel("position in the 1024-token window (bin)")
    ax2.set_ylabel("loss minus moe-8of64's (step 600), whole val split")
    ax2.set_title("where the lead is: every position, from the first token on", fontsize=8)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fig_scaling(sc: list[dict], path: Path) -> list[dict]:
    table = []
    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    for fam, mark in (("scaling-ultramem", "o"), ("scaling-moe", "s")):
        pts = sorted((r for r in sc if r["family"] == fam), key=lambda r: r["params"])
        for key, ls in (("val_loss_full", "-"), ("val_loss", ":")):
            ax.plot([r["params"] / 1e6 for r in pts], [r[key] for r in pts], marker=mark, ls=ls,
                    label=f"{fam.split('-')[1]} ({'whole val split' if key == 'val_loss_full' else 'curve slice'})")
        table += [{"family": fam, "model": r["model"], "params": r["params"], "active_params": r["active_params"],
                   "flops_per_token": r["flops_per_token"], "val_loss": r["val_loss"],
                   "val_loss_full": r["val_loss_full"]} for r in pts]
    ax.set_xscale("log")
    ax.set_xlabel("parameters (M, embeddings excluded; log)")
    ax.set_ylabel("validation loss at 9.83 M tokens (nats/token)")
    ax.set_title("Sparse scaling at fixed top-m / top-k (v1 host, 600 steps, one H200)", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return table


def fig_overtake(ov: list[dict], path: Path) -> dict:
    """``ov``: the finished pair (UltraMem, dense host; the last call) and call 2's dense-flops."""
    by = {r["model"]: {int(k): v for k, v in r["val_curve"].items()} for r in ov}
    um = by["ultramem"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    for name, c in by.items():
        ax.plot(list(c), list(c.values()), marker="o", ms=2.5, label=f"{name} (to step {max(c)})")
    ax.set_xlabel("step (16 x 1024 tokens; 2000-step cosine schedule)")
    ax.set_ylabel("validation loss, curve slice")
    ax.set_ylim(1.7, 6.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    gap = {}
    for name in ("dense", "dense-flops"):
        steps = [s for s in um if s in by[name]]
        gap[name] = {s: by[name][s] - um[s] for s in steps}
        ax2.plot(steps, list(gap[name].values()), marker="o", label=f"{name} minus ultramem")
    ax2.axhline(0, color="k", lw=0.5)
    ax2.set_xlabel("step")
    ax2.set_ylabel("loss gap (> 0: UltraMem ahead)")
    ax2.set_title("UltraMem's lead at equal tokens (dense-flops: an earlier call, stopped at 1795)", fontsize=8)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {k: {str(s): round(v, 4) for s, v in g.items()} for k, g in gap.items()}


def add_session6(doc: dict) -> dict:
    a, b = rows(load("v2d-call1"), "v2-diagnosis", "v2d-call1"), rows(load("v2d-call2"), "v2-diagnosis", "v2d-call2")
    for r in b:
        r["model"] += " (call 2)"
    sc = rows(load("scaling"), "", "scaling")
    for r, spec in zip(sc, [x for x in load("scaling")["runs"] if x["status"] != "pending"]):
        r["family"] = spec["family"]
    v1x = rows(load("v1-extra"), "v1", "v1-extra")
    ov_old = rows(load("overtake"), "overtake", "overtake")  # call 2: stopped at the deadline
    for r in ov_old:
        r["model"] += " (call 2)"
    ov = rows(load("overtake2"), "overtake", "overtake2")  # the lead's call: the pair to step 2000
    doc["runs"] += a + b + sc + v1x + ov + ov_old
    doc["command"] += ("; session 6: " + GPU.format(r=1, s=420) + "; " + GPU.format(r=2, s=290)
                       + " (EXPS2 as in quality.md); OUT=out STOP=430 bash benchmarks/explore/final_s6_gpu.sh"
                       + "; python benchmarks/explore/quality_families.py")
    doc["sparse_scaling"] = fig_scaling(sc, RES / "quality-scaling.png")
    flops = [r | {"model": "dense-flops"} for r in ov_old if r["model"] == "dense-flops (call 2)"]
    doc["overtake"] = {"gap_by_step": fig_overtake(ov + flops, RES / "quality-overtake.png"),
                       "note": "2000-step schedule; UltraMem and its dense host ran to step 2000 in one call "
                               "(s6-overtake2-h200.json); dense-flops is call 2's run, stopped at step 1795"}
    fig_v2(a, [r | {"model": r["model"].replace(" (call 2)", "")} for r in b], RES / "quality-v2-diagnosis.png")
    caus = load("causality")
    doc["causality"] = {"device": caus["device"], "command": caus["command"], "tokens": [caus["batch"], caus["seq"]],
                        "cut": caus["cut"],
                        "models": [{k: m[k] for k in ("experiment", "run", "leak", "logits", "embed_grad", "param_grad")}
                                   for m in caus["models"]]}
    doc["overlap"] = OVERLAP
    return doc
