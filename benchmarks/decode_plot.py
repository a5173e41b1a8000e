"""Figures of a decode benchmark JSON (``benchmarks/decode.py``), in the manner of UltraMem
Fig. 1(b) (step time vs batch), Fig. 1(c) (memory access vs batch) and Fig. 6(c) (step time vs
sparse parameters at fixed top-m), plus achieved bandwidth against the same run's copy."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(rows: list[dict], family: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["family"] == family:
            out[r["model"] + (" (overlap)" if r.get("overlap") else "")].append(r)
    return {k: sorted(v, key=lambda r: r["batch"]) for k, v in out.items()}


def plot(path: str) -> list[Path]:
    doc = json.loads(Path(path).read_text())
    rows, fams = doc["rows"], list(dict.fromkeys(r["family"] for r in doc["rows"]))
    outs = []
    if fams:
        fig, axes = plt.subplots(3, len(fams), figsize=(5.2 * len(fams), 12), squeeze=False)
        for j, fam in enumerate(fams):
            for name, rs in _series(rows, fam).items():
                b = [r["batch"] for r in rs]
                style = "--" if "(overlap)" in name else "-"
                axes[0][j].plot(b, [r["ms"] for r in rs], style, marker="o", ms=3, label=name)
                axes[1][j].plot(b, [r["bytes"] / 1e9 for r in rs], style, marker="o", ms=3, label=name)
                axes[2][j].plot(b, [r["GBps"] for r in rs], style, marker="o", ms=3, label=name)
            if "copy_GBps" in doc:
                axes[2][j].axhline(doc["copy_GBps"], color="k", lw=0.8, ls=":", label="copy (read + write)")
            for i, lab in enumerate(("decode step (ms)", "bytes read per step (GB)", "achieved GB/s")):
                ax = axes[i][j]
                ax.set_xscale("log", base=2)
                ax.set_xlabel("batch")
                ax.set_ylabel(lab)
                ax.grid(alpha=0.3)
            axes[0][j].set_title(f"{fam} family ({doc['device']})")
            axes[0][j].legend(fontsize=7)
            axes[2][j].legend(fontsize=7)
        fig.suptitle("Decode step, CUDA graph, bf16, random weights (kv per row in the JSON)")
        fig.tight_layout()
        out = Path(path).with_suffix(".png")
        fig.savefig(out, dpi=110)
        outs.append(out)
    if doc.get("fig6c"):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        by_b: dict[int, list[dict]] = defaultdict(list)
        for r in doc["fig6c"]:
            by_b[r["batch"]].append(r)
        for b, rs in sorted(by_b.items()):
            rs.sort(key=lambda r: r["value_params"])
            base = rs[0]["ms"]
            ax.plot([r["value_params"] / 1e9 for r in rs], [r["ms"] / base for r in rs], marker="o", label=f"batch {b}")
        ax.axhline(1.1, color="k", lw=0.8, ls=":", label="+10 % (target)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("value parameters (B), fixed top-m")
        ax.set_ylabel("step time / 1x rows")
        ax.set_title("UltraMem-227M, 1x-8x value rows (cf. UltraMem Fig. 6c)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = Path(path).with_name(Path(path).stem + "-fig6c.png")
        fig.savefig(out, dpi=110)
        outs.append(out)
    return outs
