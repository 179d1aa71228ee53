"""The search's picture: val mAP against learning rate, one colour per lambda schedule family."""
from __future__ import annotations

from pathlib import Path


def plot_trials(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    families = sorted({str(r["params"].get("lambda_schedule", "fixed")) for r in rows})
    for fam in families:
        pts = [r for r in rows if str(r["params"].get("lambda_schedule", "fixed")) == fam]
        ax.scatter([r["params"].get("lr", r["params"].get("lr_joint", float("nan"))) for r in pts],
                   [r["val_map"] for r in pts], label=fam, s=30)
    ax.set(xscale="log", xlabel="learning rate", ylabel="val mAP", title="trials: val mAP vs lr and lambda schedule")
    ax.legend(title="lambda schedule", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
