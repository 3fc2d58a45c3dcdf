"""PNG plots of a run: speed-up against ``grouped_mm`` (else ``eager``) over tokens, and peak memory.

matplotlib is optional (``pip install moefuse[bench]``); without it the plots are skipped with a message."""

from __future__ import annotations

from pathlib import Path

from .runner import BASELINES


def _panels(rows: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """Timed rows by (level, group, mode): one subplot each."""
    panels: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        if "median_ms" in row:
            panels.setdefault((row["level"], row["group"], row["mode"]), []).append(row)
    return panels


def _title(key: tuple[str, str, str]) -> str:
    level, group, mode = key
    return " ".join(part for part in (level, group, mode) if part)


def write_plots(result: dict, json_path: Path) -> list[Path] | str:
    """``<json stem>_speedup.png`` and ``<json stem>_memory.png`` beside the JSON; a message instead when
    matplotlib is missing or there is nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install 'moefuse[bench]')"
    panels = _panels(result["rows"])
    if not panels:
        return "plots skipped: no case was timed"
    device = result["environment"].get("gpu") or "CPU"
    written = []

    def figure(suffix: str, draw, ylabel: str) -> None:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
        for ax, (key, rows) in zip(axes[0], panels.items(), strict=True):
            draw(ax, rows)
            ax.set_title(_title(key))
            ax.set_xlabel("tokens")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        fig.suptitle(f"moefuse bench: {result['config']['name']}, {result['dtype']}, {device}")
        fig.tight_layout()
        path = json_path.with_name(f"{json_path.stem}_{suffix}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    baseline = next((b for b in BASELINES if any(r["implementation"] == b for r in result["rows"])), None)
    if baseline is not None:

        def speedup(ax, rows: list[dict]) -> None:
            for name in dict.fromkeys(r["implementation"] for r in rows):
                points = [
                    (r["tokens"], r[f"speedup_vs_{baseline}"]) for r in rows if r["implementation"] == name
                ]
                points = sorted(p for p in points if p[1] is not None)
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=name)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            tokens = sorted({r["tokens"] for r in rows})
            ax.set_xscale("log", base=2)
            ax.set_xticks(tokens, [str(t) for t in tokens])
            ax.minorticks_off()

        figure("speedup", speedup, f"speed-up vs {baseline}")
    if any(r.get("peak_gib") is not None for rows in panels.values() for r in rows):

        def memory(ax, rows: list[dict]) -> None:
            names = list(dict.fromkeys(r["implementation"] for r in rows))
            tokens = sorted({r["tokens"] for r in rows})
            width = 0.8 / len(names)
            for i, name in enumerate(names):
                peaks = {r["tokens"]: r["peak_gib"] for r in rows if r["implementation"] == name}
                xs = [t + (i - (len(names) - 1) / 2) * width for t in range(len(tokens))]
                ax.bar(xs, [peaks.get(t) or 0.0 for t in tokens], width, label=name)
            ax.set_xticks(range(len(tokens)), [str(t) for t in tokens])

        figure("memory", memory, "peak GiB")
    if not written:
        return "plots skipped: no baseline (grouped_mm or eager) and no memory figures (CPU run)"
    return written
