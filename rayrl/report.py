"""Render a run's ``metrics.jsonl`` to PNG curves and a small HTML page (for people without W&B).

Metrics are grouped into families: a key without a slash is its own family (``loss``, ``lr``,
``grad_norm``, ``tokens_per_s``); keys with a slash are grouped by their prefix (``eval/loss`` and
``eval/accuracy`` -> ``eval``; ``reward/mean`` and ``reward/std`` -> ``reward``), one subplot per key.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Any

from rayrl.tracking import METRICS_FILE, read_metrics

REPORT_DIR = "report"
# Families shown first, in this order; the rest follow alphabetically.
_FIRST = ("loss", "reward", "eval", "rewards", "lr", "grad_norm")


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_families(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{family: {key: [(step, value), ...]}} for every key with at least one numeric value."""
    families: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in rows:
        step = row.get("step")
        if not _numeric(step):
            continue
        for key, value in row.items():
            if key == "step" or not _numeric(value):
                continue
            family = key.split("/", 1)[0] if "/" in key else key
            families.setdefault(family, {}).setdefault(key, []).append((step, float(value)))
    order = {name: i for i, name in enumerate(_FIRST)}
    return dict(sorted(families.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def _file_name(family: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", family).strip("._") or "metric"


def render_report(output_dir: str | Path, destination: str | Path | None = None) -> list[Path]:
    """Plot ``output_dir/metrics.jsonl``: one PNG per metric family plus ``index.html``.

    Files go to ``destination`` (default ``output_dir/report``). Returns the written paths, the PNGs
    first (in display order) and ``index.html`` last. Raises FileNotFoundError when there is no
    metrics file.
    """
    import matplotlib  # slow: matplotlib (the CLI imports this module)

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # slow: matplotlib; after choosing the Agg backend

    output_dir = Path(output_dir)
    if not (output_dir / METRICS_FILE).is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {output_dir}")
    destination = Path(destination) if destination else output_dir / REPORT_DIR
    destination.mkdir(parents=True, exist_ok=True)
    families = metric_families(read_metrics(output_dir))

    written: list[Path] = []
    for family, series in families.items():
        keys = sorted(series)
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), squeeze=False, sharex=True)
        for ax, key in zip(axes[:, 0], keys):
            points = sorted(series[key])
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.4)
            ax.set_ylabel(key)
            ax.grid(True, alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(f"{family} — {output_dir.name}")
        fig.tight_layout()
        path = destination / f"{_file_name(family)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    items = "\n".join(
        f'<h2>{html.escape(family)}</h2>\n<p>{html.escape(", ".join(sorted(families[family])))}</p>\n'
        f'<img src="{html.escape(p.name)}" alt="{html.escape(family)}">'
        for family, p in zip(families, written))
    page = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>rayrl report: "
            f"{html.escape(str(output_dir))}</title></head>\n<body>\n<h1>rayrl report</h1>\n"
            f"<p>{html.escape(str(output_dir / METRICS_FILE))}</p>\n"
            + (items or "<p>no numeric metrics yet</p>") + "\n</body></html>\n")
    index = destination / "index.html"
    index.write_text(page)
    written.append(index)
    return written
