"""The figures of a run as a terminal table, and the README's markdown tables made from saved runs' JSON."""

from __future__ import annotations

import json
from pathlib import Path

from .runner import add_ratios

README_START = "<!-- moefuse bench report: start (made by `moefuse bench --report`, do not edit by hand) -->"
README_END = "<!-- moefuse bench report: end -->"


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e4:
        return f"{value / 1e3:.1f}k"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _check(row: dict) -> str:
    check = row.get("check")
    if check is None:
        return ""
    if check.get("is_reference"):
        return "reference"
    verdict = "ok" if check["ok"] else "MISMATCH"
    return f"{verdict} {check['max_relative_error']:.1e}"


def _cells(row: dict) -> dict[str, str]:
    name = row["implementation"] + (f" [{row['backend']}]" if row.get("backend") else "")
    cells = {
        "level": row["level"],
        "tokens": str(row["tokens"]),
        "group": row["group"] or "-",
        "mode": row["mode"],
        "implementation": name,
    }
    if "error" in row:
        return {**cells, "ms": row["error"]}
    peak = row.get("fraction_of_dense_peak")
    return {
        **cells,
        "ms": _number(row["median_ms"]),
        "tokens/s": _number(row["tokens_per_s"]),
        "TFLOP/s": _number(row["tflops"]),
        "% dense": "-" if peak is None else f"{100 * peak:.0f}%",
        "peak GiB": "-" if row.get("peak_gib") is None else f"{row['peak_gib']:.2f}",
        "like for like": _ratio(row.get("speedup_like_for_like")),
        "vs compiled": _ratio(row.get("speedup_vs_compiled_baseline")),
        "vs grouped_mm": _ratio(row.get("speedup_vs_grouped_mm")),
        "vs eager": _ratio(row.get("speedup_vs_eager")),
        "check": _check(row),
    }


TERMINAL_COLUMNS = (
    "level",
    "tokens",
    "group",
    "mode",
    "implementation",
    "ms",
    "tokens/s",
    "TFLOP/s",
    "% dense",
    "peak GiB",
    "like for like",
    "vs compiled",
    "vs grouped_mm",
    "vs eager",
    "check",
)
# Speed-up columns: against grouped_mm given the same suffixes (loss, norms, compile); against it compiled with
# the same loss and norms; against plain grouped_mm and eager (Transformers' loss and norms, no compile).
RATIO_FIELDS = {
    "like for like": "speedup_like_for_like",
    "vs compiled": "speedup_vs_compiled_baseline",
    "vs grouped_mm": "speedup_vs_grouped_mm",
    "vs eager": "speedup_vs_eager",
}


def ordered_rows(rows: list[dict], result: dict) -> list[dict]:
    """By level, token count, group and mode as run, then the implementations in the order asked for."""

    def first_seen(field: str) -> dict:
        return {value: i for i, value in enumerate(dict.fromkeys(r[field] for r in result["rows"]))}

    levels, groups, modes = first_seen("level"), first_seen("group"), first_seen("mode")
    implementations = {name: i for i, name in enumerate(result["implementations"])}

    def key(row: dict) -> tuple:
        where = (levels[row["level"]], row["tokens"], groups[row["group"]], modes[row["mode"]])
        return (*where, implementations[row["implementation"]])

    return sorted(rows, key=key)


def terminal_table(rows: list[dict]) -> str:
    """Aligned plain-text table of every row (an error takes the place of the figures)."""
    cells = [_cells(row) for row in rows]
    widths = {
        c: max([len(c), *(len(r.get(c, "")) for r in cells if "tokens/s" in r)]) for c in TERMINAL_COLUMNS
    }
    lines = ["  ".join(c.ljust(widths[c]) for c in TERMINAL_COLUMNS).rstrip()]
    for r in cells:
        if "tokens/s" in r:
            lines.append("  ".join(r[c].ljust(widths[c]) for c in TERMINAL_COLUMNS).rstrip())
        else:
            head = "  ".join(r[c].ljust(widths[c]) for c in TERMINAL_COLUMNS[:5])
            lines.append(f"{head}  {r['ms']}")
    return "\n".join(lines)


def _agreement(result: dict, level: str) -> str:
    checks = [r["check"] for r in result["rows"] if r["level"] == level and "check" in r]
    compared = [c for c in checks if not c.get("is_reference")]
    if not compared:
        return "Nothing compared (one implementation)."
    references = ", ".join(f"`{name}`" for name in dict.fromkeys(c["reference"] for c in compared))
    worst = max(c["max_relative_error"] for c in compared)
    return f"Outputs and gradients checked against {references}: largest relative error {worst:.1e}."


def _level_heading(result: dict, level: str, path: str) -> str:
    env = result["environment"]
    device = env.get("gpu") or f"CPU ({env.get('cpu', '?')})"
    dense = result["dense_matmul"]
    title = result["descriptions"][level].format(layers=result["options"].get("layers"))
    commit = env.get("moefuse_commit", "unknown")
    moefuse = env["moefuse"] + (
        "" if commit == "unknown" else f" ({commit[:7]}{commit[40:]})"
    )  # commit+dirty
    versions = ", ".join(
        [f"moefuse {moefuse}", *(f"{pkg} {env[pkg]}" for pkg in ("torch", "triton", "transformers", "peft"))]
    )
    return (
        f"**{level}**: {title}; `{result['config']['name']}` shapes, {result['dtype']}, on **{device}** "
        f"(dense {dense['dtype']} matmul measured in the same run: {_number(dense['tflops'])} TFLOP/s). "
        f"{versions}. {_agreement(result, level)} Source: `{path}`."
    )


MARKDOWN_COLUMNS = ("tokens", "group", "mode", "implementation", "ms", "tokens/s", "TFLOP/s", "peak GiB")


def markdown_tables(results: list[tuple[str, dict]]) -> str:
    """One table per level of each saved run, with speed-ups like for like (``grouped_mm`` given the same loss,
    norms and compile setting), against compiled ``grouped_mm``, and against plain ``grouped_mm`` and ``eager``.
    The ratios are taken again from the rows' times, so runs saved before a column existed show it too."""
    parts = []
    for path, result in results:
        add_ratios(result["rows"], result.get("dense_matmul", {}).get("tflops"))
        if not result.get("ok"):
            raise SystemExit(
                f"moefuse bench --report: {path} records a failed run ({'; '.join(result.get('failures', []))}); "
                "a run whose outputs disagree is not a result: rerun it"
            )
        for level in result["levels"]:
            rows = ordered_rows(
                [r for r in result["rows"] if r["level"] == level and "median_ms" in r], result
            )
            if not rows:
                continue
            columns = [c for c in MARKDOWN_COLUMNS if c != "group" or any(r["group"] for r in rows)]
            columns += [c for c, field in RATIO_FIELDS.items() if any(r.get(field) for r in rows)]
            cells = [_cells(r) for r in rows]
            align = ["---" if c in ("group", "mode", "implementation") else "---:" for c in columns]
            lines = [
                _level_heading(result, level, path),
                "",
                "| " + " | ".join(columns) + " |",
                "|" + "|".join(align) + "|",
            ]
            lines += ["| " + " | ".join(c[col] for col in columns) + " |" for c in cells]
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def load_results(paths: list[str]) -> list[tuple[str, dict]]:
    results = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"moefuse bench --report: cannot read {path}: {error}") from None
        if "rows" not in result or "levels" not in result:
            raise SystemExit(f"moefuse bench --report: {path} is not a JSON written by `moefuse bench`")
        results.append((path, result))
    return results


def update_readme(readme: Path, tables: str) -> None:
    """Replace the text between the report markers of ``readme`` with ``tables``."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(
            f"moefuse bench --readme: {readme} has no report markers; add the lines\n{README_START}\n{README_END}\n"
            "where the tables go"
        )
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{tables}{README_END}{tail}")
