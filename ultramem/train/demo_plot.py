"""The demo's figure: held-out validation loss against step, fact recall against step, and
the final recall of each model with its Wilson 95 % interval (whiskers) over the chance line."""

from __future__ import annotations

from pathlib import Path

from ultramem.train.metrics import read_metrics


def plot_demo(result: dict, run_dirs: list[Path], out: Path) -> Path:
    """``result``: the demo's ``demo.json`` dict (``rows`` with ``name``, ``recall``,
    ``recall_curve``; ``facts.chance``); ``run_dirs``: the runs, in the order of ``rows``."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows, chance = result["rows"], result["facts"]["chance"]
    fig, (ax_val, ax_curve, ax_bar) = plt.subplots(1, 3, figsize=(14, 4.2))
    for i, (row, run) in enumerate(zip(rows, run_dirs)):
        color = f"C{i}"
        val = [(m["step"], m["val_loss"]) for m in read_metrics(run) if "val_loss" in m]
        if val:
            ax_val.plot(*zip(*val), "o-", color=color, ms=4, label=row["name"])
        curve = row["recall_curve"]
        steps = [c["step"] for c in curve]
        ax_curve.plot(steps, [c["acc"] for c in curve], "o-", color=color, ms=4, label=row["name"])
        ax_curve.fill_between(steps, [c["ci95"][0] for c in curve], [c["ci95"][1] for c in curve],
                              color=color, alpha=0.15)
        acc, (lo, hi) = row["recall"]["acc"], row["recall"]["ci95"]
        ax_bar.bar(i, acc, color=color, yerr=[[acc - lo], [hi - acc]], capsize=8)
        ax_bar.text(i, hi + 0.01, f"{acc:.1%}", ha="center", va="bottom")
    ax_val.set(xlabel="step", ylabel="val loss (nats/token, held-out English)", title="language modelling")
    for ax in (ax_curve, ax_bar):
        ax.axhline(chance, color="grey", ls=":", label=f"chance {chance:.1%}")
    ax_curve.set_ylim(0, 1)
    ax_bar.set_ylim(0, 1.12)  # room for the labels above the whiskers
    ax_curve.set(xlabel="step", ylabel="fact recall (top-1 of candidates)", title="recall during training")
    ax_bar.set_xticks(range(len(rows)), [r["name"] for r in rows])
    ax_bar.set(ylabel="fact recall, 95 % CI", title=f"final recall ({result['facts']['queries']} facts)")
    for ax in (ax_val, ax_curve):
        ax.grid(alpha=0.3)
        ax.legend()
    ax_bar.legend(loc="lower right", framealpha=0.9)
    fig.suptitle(f"{result['name']}  ({result['steps']} steps each)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
