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
            out[r["model"] + (" (overlap)" if r.get("overlap") else "")
                + (f" [{r['attention']}]" if r.get("attention") in ("sdpa", "rope_sdpa") else "")].append(r)
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
            ceil = doc.get("ceilings") or {}
            if "copy_GBps" in doc or "copy_GBps" in ceil:
                axes[2][j].axhline(doc.get("copy_GBps", ceil.get("copy_GBps")), color="k", lw=0.8, ls=":",
                                   label="copy (read + write)")
            if "read_GBps" in ceil:
                axes[2][j].axhline(ceil["read_GBps"], color="k", lw=0.8, ls="--", label="read-only (sum)")
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
    if doc.get("parts"):
        outs.append(plot_parts(doc, Path(path).with_name(Path(path).stem + "-parts.png")))
    if doc.get("attention"):
        outs.append(plot_attention(doc, Path(path).with_name(Path(path).stem + "-attn.png")))
    return outs


def plot_attention(doc: dict, out: Path) -> Path:
    """The decode attention op alone: split-KV kernel and masked SDPA, time and the K/V bytes'
    bandwidth vs batch, per layer shape and length kind (``decode_splitkv.attention_ab``)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in doc["attention"]:
        groups[(r["H"], r["hd"], r["L"], r["lengths"])].append(r)
    for i, (key, rs) in enumerate(sorted(groups.items())):
        rs.sort(key=lambda r: r["batch"])
        b = [r["batch"] for r in rs]
        lab = f"H={key[0]} hd={key[1]} L={key[2]} {key[3]}"
        for impl, style in (("split_kv", "-"), ("sdpa", ":")):
            axes[0].plot(b, [r[f"{impl}_us"] for r in rs], style, marker="o", ms=3, color=f"C{i}",
                         label=f"{impl}, {lab}")
            axes[1].plot(b, [r[f"{impl}_GBps"] for r in rs], style, marker="o", ms=3, color=f"C{i}")
    ceil = doc.get("ceilings") or {}
    if "read_GBps" in ceil:
        axes[1].axhline(ceil["read_GBps"], color="k", lw=0.8, ls="--", label="read-only (sum)")
        axes[1].legend(fontsize=7)
    for ax, lab in zip(axes, ("us per call (one layer)", "K/V bytes read / time (GB/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"One-token decode attention: split-KV kernel (solid) vs masked SDPA (dotted), {doc['device']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


PARTS = ("attention", "ffn", "memory", "head", "embed")


def plot_parts(doc: dict, out: Path) -> Path:
    """Stacked bars: each part's serial time per model and batch, the step's time as a marker
    (the glue is the step minus the parts; steps come from the same run's rows where they exist,
    as the breakdown's own step of an MoE fed one repeated token in the first run)."""
    steps = {(r["model"], r["batch"], r.get("attention")): r["ms"] for r in doc["rows"] if not r.get("overlap")}
    rows = doc["parts"]
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(rows)), 4.5))
    labelled: set[str] = set()
    for i, r in enumerate(rows):
        bottom = 0.0
        for k, name in enumerate(PARTS):
            ms = r["parts"].get(name, {}).get("ms", 0.0)
            ax.bar(i, ms, bottom=bottom, color=f"C{k}", label=None if name in labelled or not ms else name)
            labelled |= {name} if ms else set()
            bottom += ms
        ax.plot(i, steps.get((r["model"], r["batch"], r.get("attention")), r["step_ms"]), "k_", ms=14, mew=2,
                label="whole step" if i == 0 else None)
    ax.set_xticks(range(len(rows)), [f"{r['model']}\nB={r['batch']}" + (f"\n{r['attention']}" if r.get("attention") else "")
                                     for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("ms (serial, CUDA graph)")
    ax.set_title(f"Where a decode step's time goes (kv 2048, {doc['device']})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def plot_ratios(paths: list[str], out: str) -> Path:
    """Each model's decode step over its family's dense model, against batch: one panel per
    family, each family from the last of ``paths`` that holds it (every ratio within one run),
    with the issue's 1.05x line for the memory layers."""
    fams: dict[str, tuple[str, list[dict]]] = {}
    for p in paths:
        doc = json.loads(Path(p).read_text())
        for fam in dict.fromkeys(r["family"] for r in doc["rows"]):
            fams[fam] = (Path(p).name, [r for r in doc["rows"] if r["family"] == fam])
    fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 4.2), squeeze=False)
    for ax, (fam, (src, rows)) in zip(axes[0], fams.items()):
        dense = {r["batch"]: r["ms"] for r in rows if r["model"].startswith("dense-")}
        for name, rs in _series(rows, fam).items():
            if name.startswith("dense-"):
                continue
            rs = [r for r in rs if r["batch"] in dense]
            ax.plot([r["batch"] for r in rs], [r["ms"] / dense[r["batch"]] for r in rs], marker="o", ms=3, label=name)
        ax.axhline(1.05, color="k", lw=0.8, ls=":", label="1.05x (memory-layer target)")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_yticks([1, 1.05, 1.25, 1.5, 2, 3])
        ax.set_yticklabels(["1", "1.05", "1.25", "1.5", "2", "3"])
        ax.set_xlabel("batch")
        ax.set_ylabel("decode step / dense step")
        ax.set_title(f"{fam} ({src})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Decode step relative to the family's dense model (same run per family; H200, bf16, KV 2048)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return Path(out)


if __name__ == "__main__":  # python benchmarks/decode_plot.py OUT.png A.json [B.json ...]: the ratio figure
    import sys

    print(plot_ratios(sys.argv[2:], sys.argv[1]))
