"""The plots of replay_compare.py: time per token against cache size per profile, and the
phase map of the fastest strategy over cache size and link bandwidth."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STYLE = {"hybrid": {"linewidth": 2.5, "color": "black"}, "expertflow": {"linestyle": "--"}}


def plot_time(name: str, result: dict, path) -> None:
    profiles = list(result["by_profile"])
    fig, axes = plt.subplots(1, len(profiles), figsize=(5 * len(profiles), 4.2), sharey=False)
    x = [100 * f for f in result["fractions"]]
    for ax, profile in zip(axes, profiles):
        by_capacity = result["by_profile"][profile]
        strategies = list(next(iter(by_capacity.values())))
        for s in strategies:
            y = [by_capacity[c][s]["ms_per_token"] for c in by_capacity]
            ax.plot(x, y, marker="o", label=s, **STYLE.get(s, {}))
        ax.set(xlabel="cache (% of experts)", ylabel="ms per token (modelled)", title=profile)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{name}: time per token against cache size")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")


def plot_phase(name: str, result: dict, path) -> None:
    phase = result["phase"]
    cells = phase["cells"]
    names = sorted({c["fastest"] for line in cells for c in line})
    colour = {s: i for i, s in enumerate(names)}
    grid = [[colour[c["fastest"]] for c in line] for line in cells]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("tab10", max(len(names), 2))
    ax.imshow(
        grid, cmap=cmap, vmin=-0.5, vmax=max(len(names), 2) - 0.5, aspect="auto", origin="lower"
    )
    for i, line in enumerate(cells):
        for j, c in enumerate(line):
            ax.text(
                j,
                i,
                f"{c['fastest']}\n{c['speedup_over_peer']:.2f}x\nvs {c['best_peer']}",
                ha="center",
                va="center",
                fontsize=6,
            )
    ax.set_xticks(range(len(phase["link_gbps"])), [str(g) for g in phase["link_gbps"]])
    ax.set_yticks(range(len(cells)), [f"{100 * f:.0f}%" for f in result["fractions"]])
    ax.set(
        xlabel=f"link GB/s (rest of {phase['profile']})",
        ylabel="cache (% of experts)",
        title=f"{name}: fastest strategy; hybrid's speedup over the best non-ExpertFlow one",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path}")
