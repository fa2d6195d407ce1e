"""PNG of a sweep: output throughput and latency percentiles (TTFT, TPOT, E2E) against load, one line per server."""
from __future__ import annotations

from pathlib import Path


def plot_sweep(series: dict[str, list[tuple[float, dict]]], path: str | Path, x_label: str = "concurrency",
               title: str = "") -> Path:
    """`series`: label -> [(load, summary dict from loadtests.metrics.summarize), ...]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = [
        (axes[0][0], "Output throughput (tok/s)", [("output_throughput", "-", "")]),
        (axes[0][1], "TTFT (ms)", [("median_ttft_ms", "-", " p50"), ("p99_ttft_ms", "--", " p99")]),
        (axes[1][0], "TPOT (ms)", [("median_tpot_ms", "-", " p50"), ("p99_tpot_ms", "--", " p99")]),
        (axes[1][1], "End-to-end latency (ms)", [("median_e2el_ms", "-", " p50"), ("p99_e2el_ms", "--", " p99")]),
    ]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, ylabel, keys in panels:
        for i, (label, points) in enumerate(series.items()):
            pts = sorted(points, key=lambda p: p[0])
            for key, style, suffix in keys:
                xs = [x for x, s in pts if s.get(key) is not None]
                ys = [s[key] for x, s in pts if s.get(key) is not None]
                if xs:
                    ax.plot(xs, ys, style, marker="o", color=colors[i % len(colors)], label=label + suffix)
        ax.set_xlabel(x_label)
        ax.set_ylabel(ylabel)
        loads = sorted({x for pts in series.values() for x, _ in pts if x is not None})
        if loads and loads[0] > 0 and loads[-1] / loads[0] >= 8:
            ax.set_xscale("log", base=2)
        if loads:
            ax.set_xticks(loads)
            ax.set_xticklabels([f"{t:g}" for t in loads])
            ax.minorticks_off()
        values = [v for line in ax.get_lines() for v in line.get_ydata()]
        if ylabel.endswith("(ms)") and values and min(values) > 0 and max(values) / min(values) >= 20:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
