"""Build docs/results/quality/diagnosis-s4.json and the diagnosis figures from the diagnosis rounds.

    python benchmarks/explore/quality_report.py      # reads docs/results/quality/diag-*.json
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RES = ROOT / "docs" / "results"
ROUNDS = {"round1": "diag-round1-h200.json", "round2": "diag-round2-h200.json"}
PRESET = {"dense": "dense-151m", "um": "ultramem-151m-x12"}
LABEL = {
    "dense_global": "dense, 1 % warmup (3 steps), clip 1",
    "dense_noclip": "dense, 1 % warmup, no clip",
    "dense_warm10": "dense, 10 % warmup",
    "um_global": "UltraMem, 1 % warmup, global clip",
    "um_exclude": "UltraMem, 1 % warmup, values outside the clip",
    "um_pergroup": "UltraMem, 1 % warmup, per-group clip",
    "um_noclip": "UltraMem, 1 % warmup, no clip",
    "um_authors": "UltraMem, 1 % warmup, authors' init",
    "um_warm10": "UltraMem, 10 % warmup",
    "dense_w10_s0": "dense, 10 % warmup, seed 0",
    "dense_w10_s1": "dense, 10 % warmup, seed 1",
    "um_w10": "UltraMem, 10 % warmup, Appendix-A init",
    "um_authors_w10": "UltraMem, 10 % warmup, authors' init",
}


def load(name: str) -> dict:
    return json.loads((RES / "quality" / ROUNDS[name]).read_text())


def runs_table() -> list[dict]:
    out = []
    for rnd in ROUNDS:
        d = load(rnd)
        for name, r in d["runs"].items():
            s = r["summary"] or {}
            out.append({
                "model": name, "round": rnd, "label": LABEL.get(name, name),
                "preset": PRESET[name.split("_")[0]], "family": "diagnosis",
                "overrides": "model.memory.knum=256 (65,536 rows a layer)" if name.startswith("um") else "",
                "params": s.get("params"), "active_params": s.get("active_params"),
                "flops_per_token": s.get("flops_per_token"), "tokens": s.get("tokens_seen"),
                "val_loss": s.get("val_loss"), "val_curve": r["val"], "val_loss_english": None,
                "tokens_per_s": s.get("tokens_per_s"), "probes": {},
            })
    return out


def plot_curves(path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    r1, r2 = load("round1")["runs"], load("round2")["runs"]
    for ax, runs, names, title in (
        (axes[0], r1, ["dense_global", "dense_noclip", "dense_warm10", "um_global", "um_exclude",
                       "um_pergroup", "um_noclip", "um_authors", "um_warm10"], "round 1: 300 steps (4.9 M tokens)"),
        (axes[1], r2, list(r2), "round 2: 450 steps (7.4 M tokens), 10 % warmup"),
    ):
        for n in names:
            rows = [x for x in runs[n]["rows"] if x["step"] % 10 == 0]
            ls = "--" if n.startswith("dense") else "-"
            ys = [x["loss"] for x in rows]
            ys = [sum(ys[max(0, i - 4):i + 1]) / len(ys[max(0, i - 4):i + 1]) for i in range(len(ys))]
            ax.plot([x["step"] for x in rows], ys, ls, label=LABEL[n], lw=1.2)
        ax.set_ylim(1.2, 5.0)
        ax.set_xlabel("step (8 x 2048 tokens)")
        ax.set_ylabel("train loss (mean of 5 logged steps)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    ax = axes[2]
    for n, ls in (("um_global", "-"), ("um_warm10", "--"), ("um_authors", ":")):
        rows = [x for x in r1[n]["rows"] if "mem/memory.0.out_std" in x]
        for layer in range(3):
            ax.plot([x["step"] for x in rows], [x[f"mem/memory.{layer}.out_std"] for x in rows], ls,
                    color=f"C{layer}", label=f"{LABEL[n]}, memory {layer}" if layer == 0 or n == "um_global" else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("memory-branch output std")
    ax.set_title("memory output scale (colour = memory layer)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    runs = runs_table()
    r1 = load("round1")
    doc = {
        "device": "NVIDIA H200 (one GPU; the runs of a round concurrently on it, so tokens_per_s is not a throughput figure)",
        "command": "bash benchmarks/explore/quality_diag.sh (rounds: see each file under docs/results/quality/); "
                   "python benchmarks/explore/quality_report.py",
        "data": {"source": r1["data"] if isinstance(r1["data"], str) else "", "splits": r1.get("data") if not isinstance(r1["data"], str) else None,
                 "note": "diagnosis data: ultramem data prepare --source-dir <GPU site-packages>/transformers <...>/jax, "
                         "bundled 8,192-token BPE; 34,540,169 train / 485,075 val tokens (37 held-out files). "
                         "The >= 100 M-token shared training set of issue 13 is not built yet."},
        "runs": runs,
    }
    (RES / "quality" / "diagnosis-s4.json").write_text(json.dumps(doc, indent=1) + "\n")
    plot_curves(RES / "quality-diagnosis.png")
    for r in runs:
        print(f"{r['round']:7s} {r['model']:16s} {r['val_loss']:.4f}  {r['label']}")


if __name__ == "__main__":
    main()
