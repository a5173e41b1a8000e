"""Build docs/results/quality.json and the family / ladder figures from session 5's GPU rounds.

    python benchmarks/explore/quality_families.py    # reads docs/results/quality/s5-*-h200.json
                                                     # and session 6's s6-* (quality_s6.py)

Round 1 (`OUT=... bash benchmarks/explore/quality_gpu.sh`) gave s5-v1 / s5-v2 / s5-repro; round 2
(`ROUND=2 ...`) the v1 MoE (round 1's failed on a stride check) and the ladder.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from quality_s6 import add_session6  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RES = ROOT / "docs" / "results"
Q = RES / "quality"
# UltraMem Table 2, validation-loss delta of each rung (the paper's 151M ablation, 500B tokens).
PAPER_T2 = {"01-rm-softmax": -0.006, "02-half-vdim-proj": -0.022, "03-share-query": +0.003,
            "04-split-skip": -0.015, "05-qk-norm": +0.001, "06-ive": -0.017, "07-tdqkr": -0.008,
            "08-mcs": -0.003, "09-improved-init": -0.003, "10-value-lr-decay": -0.022, "11-query-conv": -0.000}
CMD = {"v1": "ultramem experiment v1-family --out runs/v1 --jobs 5 data.path=data/code",
       "v2": "ultramem experiment v2-family --out runs/v2 --jobs 4 data.path=data/code",
       "repro": "ultramem experiment v1-family --out runs/repro --only ultramem data.path=data/code",
       "ablation": "ultramem experiment ablation-ladder --out runs/ladder --jobs 12 data.path=data/code"}


def load(name: str) -> dict:
    return json.loads((Q / f"s5-{name}-h200.json").read_text())


def rows_of(res: dict, family: str, tag: str = "") -> list[dict]:
    out = []
    for r in res["runs"]:
        if r["status"] == "pending":
            continue
        probes = {k: {"acc": v["acc"], "ci95": v["ci95"], "n": v["n"]} for k, v in (r.get("probes") or {}).items()}
        kr = (r.get("probes") or {}).get("knowledge_recall", {})
        out.append({
            "model": r["name"] + tag, "preset": r["preset"], "family": family, "overrides": r.get("overrides", []),
            "status": r["status"], "params": r["params"], "active_params": r["active_params"],
            "flops_per_token": r["flops_per_token"], "tokens": r.get("tokens"), "step": r.get("step"),
            "val_loss": r.get("val_loss"), "val_loss_english": r.get("val_loss_english"),
            "tokens_per_s": r.get("tokens_per_s"), "probes": probes,
            "knowledge_bits": kr.get("bits"), "knowledge_bits_per_param": kr.get("bits_per_param"),
            "val_curve": r.get("val_curve", {}), "command": CMD[family] + (" (rerun)" if tag else ""),
        })
    return out


def curves(rows: list[dict], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        c = {int(k): v for k, v in r["val_curve"].items()}
        if c:
            ax.plot(list(c), list(c.values()), marker="o", ms=3, label=f"{r['model']} ({r['val_loss']:.3f})")
    ax.set_xlabel("step (16 x 1024 tokens)")
    ax.set_ylabel("validation loss (nats/token, held-out code)")
    ax.set_ylim(top=min(6.5, ax.get_ylim()[1]))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ladder(rows: list[dict], path: Path, step: str = "1000") -> list[dict]:
    """Delta of each rung at ``step`` (the last step every rung reached) beside Table 2's."""
    at = [(r["model"], r["val_curve"][step]) for r in rows]
    table = []
    for (_, lp), (name, lo) in zip(at, at[1:]):
        table.append({"rung": name, "val_loss": lo, "delta": lo - lp, "paper_delta": PAPER_T2[name]})
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(table))
    ax.bar([i - 0.2 for i in x], [t["delta"] for t in table], 0.4, label=f"ours (step {step}, 4.1 M tokens)")
    ax.bar([i + 0.2 for i in x], [t["paper_delta"] for t in table], 0.4, label="paper Table 2 (500 B tokens)")
    ax.set_xticks(list(x), [t["rung"] for t in table], rotation=45, ha="right", fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("Δ validation loss vs previous rung")
    ax.set_title("UltraMem ablation ladder (D 256, 8 blocks) on the shared code set, one H200", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return table


def main() -> None:
    v1 = load("v1")
    moe = load("v1-moe")
    v1["runs"] = [r for r in v1["runs"] if r["name"] != "moe"] + [r for r in moe["runs"] if r["name"] == "moe"]
    fam_v1 = rows_of(v1, "v1")
    fam_v2 = rows_of(load("v2"), "v2")
    repro = rows_of(load("repro"), "repro", " (rerun)")
    lad = rows_of(load("ladder"), "ablation")
    manifest = json.loads((ROOT / "experiments" / "data" / "code-manifest.json").read_text())
    data = {k: manifest[k] for k in ("spec", "python", "tokenizer_sha256", "vocab_size", "val_fraction", "splits", "probes")}
    data["packages"] = [f"{p['module']} {p['version']} ({p['files']} files)" for p in manifest["packages"]]
    data["rebuild"] = "round 2 rebuilt it on a fresh machine with the committed tokenizer: manifest matched"
    same = next(r for r in fam_v1 if r["model"] == "ultramem")
    doc = {
        "device": "NVIDIA H200 (one GPU; the runs of a round trained concurrently on it, so tokens_per_s "
                  "is each run's share, not a throughput figure)",
        "command": "OUT=out bash benchmarks/explore/quality_gpu.sh; ROUND=2 OUT=out2 bash benchmarks/explore/quality_gpu.sh; "
                   "python benchmarks/explore/quality_families.py",
        "data": data,
        "runs": fam_v1 + fam_v2 + repro + lad,
        "reproducibility": {"run": "v1 ultramem, seed 0, twice", "val_loss": [same["val_loss"], repro[0]["val_loss"]],
                            "diff": abs(same["val_loss"] - repro[0]["val_loss"]), "target": 0.02},
        "ablation_ladder": ladder(lad, RES / "quality-ladder.png"),
        "diagnosis": "docs/results/quality/diagnosis-s4.json (session 4)",
    }
    doc = add_session6(doc)
    (RES / "quality.json").write_text(json.dumps(doc, indent=1) + "\n")
    curves(fam_v1, "v1 family (D 384, 8 blocks, ~140 M params, ~36.5 MFLOPs/token; dense is the host)", RES / "quality-v1.png")
    curves(fam_v2, "V2 family (D 384, 8 blocks, OLMoE host, ~118 M params, ~38.3 MFLOPs/token)", RES / "quality-v2.png")
    for r in fam_v1 + fam_v2 + repro:
        p = r["probes"]
        print(f"{r['family']:6s} {r['model']:22s} {r['params'] / 1e6:7.1f}M {r['flops_per_token'] / 1e6:6.2f}MF "
              f"val {r['val_loss']:.4f} eng {r['val_loss_english']:.4f} "
              + " ".join(f"{k}={v['acc']:.3f}[{v['ci95'][0]:.3f},{v['ci95'][1]:.3f}]" for k, v in p.items()))
    for t in doc["ablation_ladder"]:
        print(f"{t['rung']:20s} {t['val_loss']:.4f} {t['delta']:+.4f} paper {t['paper_delta']:+.3f}")


if __name__ == "__main__":
    main()
