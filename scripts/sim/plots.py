"""PNG figures of a run's measures (matplotlib, the optional ``sim`` extra; tests never need it).

python scripts/sim/plots.py /tmp/sim.json docs/sim      # figures from a run's --json output
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.sim.population import ADVERSARIES


def plot_all(results: dict[str, dict[str, Any]], out_dir: Path, *, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    modes = list(results)
    days = range(len(next(iter(results.values()))["per_day"]["utilisation_cpu"]))
    paths = []

    fig, axes = plt.subplots(1, len(ADVERSARIES), figsize=(4 * len(ADVERSARIES), 3.4), sharey=True)
    for ax, attack in zip(axes, ADVERSARIES, strict=True):
        for mode in modes:
            ax.plot(days, results[mode]["per_day"]["wrong_accepted"][attack], marker="o", label=mode)
        ax.set_title(f"wrong results accepted: {attack}")
        ax.set_xlabel("day")
    axes[0].set_ylabel("share of completed jobs")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(out_dir / "wrong_accepted.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(ADVERSARIES), figsize=(4 * len(ADVERSARIES), 3.4), sharey=True)
    for ax, attack in zip(axes, ADVERSARIES, strict=True):
        for mode in modes:
            ax.plot(days, results[mode]["per_day"]["dishonest_share"][attack], marker="o", label=mode)
        ax.set_title(f"jobs given to {attack}")
        ax.set_xlabel("day")
    axes[0].set_ylabel("share of primary runs")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(out_dir / "dishonest_share.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for mode in modes:
        pd = results[mode]["per_day"]
        axes[0].plot(days, pd["replicated_work_share"], marker="o", label=mode)
        axes[1].plot(days, pd["completed_by_deadline"], marker="o", label=mode)
        axes[2].plot(days, pd["utilisation_cpu"], marker="o", label=f"{mode} CPU")
    axes[0].set_title("replicated work / all work")
    axes[1].set_title("jobs completed by their deadline")
    axes[2].set_title("utilisation of offered CPUs")
    for ax in axes:
        ax.set_xlabel("day")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(out_dir / "allocation.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for mode in modes:
        pd = results[mode]["per_day"]
        for cls, style in (("cpu", "-"), ("gpu", "--")):
            axes[0].plot(days, pd["price_index_median"][cls], style, marker="o", label=f"{mode} {cls}")
            axes[1].plot(days, pd["price_dispersion"][cls], style, marker="o", label=f"{mode} {cls}")
    axes[0].set_title("median agreed price / reference price")
    axes[1].set_title("quote dispersion (std / mean within a job)")
    for ax in axes:
        ax.set_xlabel("day")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    paths.append(out_dir / "prices.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def main(argv: list[str]) -> int:
    data = json.loads(Path(argv[0]).read_text())
    config = data["config"]
    for path in plot_all(data["results"], Path(argv[1]), title=f"N = {config['nodes']}, {config['days']} days"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
