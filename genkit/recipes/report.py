"""The report of a recipe: ``results.md``, ``results.csv``, ``results.json`` and a plot of test
bits/dim against training time, from the rows :func:`genkit.recipes.runner.run_one` returns.

Every bits/dim carries its two errors: ``se`` (the spread of the test examples, a paper's ±)
and ``mc_se`` (the Monte-Carlo error of the estimate, given the test set); see
:mod:`genkit.evaluation`. ELBO terms are shown in bits/dim, ``-term / (D ln 2)``, so that they
add up to the total.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from genkit.training.checkpoint import write_atomic

#: The plot's file name in the output folder.
PLOT = "bits_per_dim_vs_time.png"
#: The plot of sample quality against sampling cost (recipes with metrics).
QUALITY_PLOT = "quality_vs_sampling_cost.png"


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        if abs(value) < 0.5 * 10.0**-digits:
            value = 0.0  # no "-0.0000"
        return f"{value:.{digits}f}"
    return str(value)


def _clean(value: Any) -> Any:
    """NaN and infinities as ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def term_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every ELBO term of every run, in order of first appearance."""
    names: list[str] = []
    for row in rows:
        names += [n for n in row["terms_bits_per_dim"] if n not in names]
    return names


def quality_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every sample-quality metric of every run (``[eval] metrics``), in order."""
    names: list[str] = []
    for row in rows:
        names += [n for n in (row.get("sample_metrics") or {}).get("metrics", {}) if n not in names]
    return names


def quality_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Each metric, KID's std, each metric's floor (test split against train split), and the
    features they were computed on; none without ``[eval] metrics``."""
    out: list[str] = []
    for name in quality_names(rows):
        out += [name, *(["kid_std"] if name == "kid" else []), f"{name}_floor"]
    return [*out, "features"] if out else []


def _features(block: dict[str, Any]) -> str:
    info = block.get("features", {})
    text = str(info.get("name", "?"))
    if info.get("test_accuracy") is not None:
        text += f" (test accuracy {info['test_accuracy']:.4f})"
    return f"{text}, {block.get('samples')} samples"


def quality_cells(row: dict[str, Any], names: list[str]) -> list[str]:
    """The cells of :func:`quality_columns` for one row."""
    block = row.get("sample_metrics")
    if not names:
        return []
    if not block:
        return [""] * (sum(3 if n == "kid" else 2 for n in names) + 1)
    cells = []
    for name in names:
        entry = block["metrics"].get(name) or {}
        floor = (block.get("floor") or {}).get(name) or {}
        cells.append(_num(entry.get("value")) if entry else "")
        if name == "kid":
            cells.append(_num(entry.get("std")) if entry else "")
        cells.append(_num(floor.get("value")) if floor else "")
    return [*cells, _features(block)]


def columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The table's columns: run, model, decoder, parameters, steps, training seconds, each
    term, bits/dim, se, mc_se, network evaluations per example, sampling images/s."""
    return [
        "run",
        "model",
        "decoder",
        "parameters",
        "steps",
        "train_seconds",
        *[f"{n} (bits/dim)" for n in term_names(rows)],
        "bits_per_dim",
        "se",
        "mc_se",
        "nfe_per_example",
        "sample_images_per_second",
        *quality_columns(rows),
    ]


def _params(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in row["params"].items()) or "defaults"


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The rows of :func:`columns` as text."""
    names = term_names(rows)
    quality = quality_names(rows)
    out = []
    for row in rows:
        terms = row["terms_bits_per_dim"]
        out.append(
            [
                row["run"],
                row["model"],
                row["decoder"],
                _params(row),
                str(row["steps"]),
                _num(row["train_seconds"], 1),
                *[_num(terms.get(n)) if n in terms else "" for n in names],
                _num(row["bits_per_dim"]),
                _num(row["se"]),
                _num(row["mc_se"]),
                _num(row["nfe_per_example"], 1),
                _num(row["sample_images_per_second"], 1),
                *quality_cells(row, quality),
            ]
        )
    return out


def markdown(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """A Markdown table of the results, under ``title``."""
    head = columns(rows)
    lines = [f"# {title}", ""] if title else []
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    lines += [
        "",
        "bits/dim = -ELBO / (D ln 2) on the test split, an upper bound on the model's bits/dim of "
        "the 8-bit data; se: std over test examples / sqrt(N); mc_se: the Monte-Carlo error of "
        "the estimate given the test set; terms in bits/dim add up to the total.",
    ]
    if quality_names(rows):
        lines += [
            "",
            "Sample quality (docs/metrics.md): each metric of the run's samples against the test "
            "split, on the named features; *_floor: the same metric for as many train-split "
            "examples against the test split (data against data: the best a model can show). "
            "Classifier-feature FIDs are not comparable with Inception FIDs.",
        ]
    lines += quality_table(rows)
    return "\n".join(lines) + "\n"


def plain(rows: Sequence[dict[str, Any]]) -> str:
    """The table for a terminal: run, decoder, steps, seconds, bits/dim ± se ± mc_se, NFE."""
    lines = [
        f"{'run':<18}{'decoder':<34}{'steps':>7}{'train s':>9}{'bits/dim':>10}"
        f"{'se':>8}{'mc_se':>8}{'nfe/ex':>9}{'img/s':>9}"
    ]
    for row in rows:
        lines.append(
            f"{row['run']:<18}{row['decoder']:<34}{row['steps']:>7}"
            f"{_num(row['train_seconds'], 0):>9}{_num(row['bits_per_dim']):>10}"
            f"{_num(row['se']):>8}{_num(row['mc_se']):>8}{_num(row['nfe_per_example'], 1):>9}"
            f"{_num(row['sample_images_per_second'], 1):>9}"
        )
    return "\n".join(lines)


def write_report(
    out: Path, rows: Sequence[dict[str, Any]], recipe: dict[str, Any], seconds: float
) -> list[Path]:
    """Write ``results.md``, ``results.csv``, ``results.json`` and the plot into ``out``
    (each atomically); returns their paths."""
    rows = list(rows)
    title = f"{recipe.get('name', 'recipe')}: test bits/dim on {recipe.get('data', '?')}"
    md = markdown(rows, title)
    curves = f"{recipe.get('name', 'recipe')}: bits/dim on {recipe.get('data', '?')}"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns(rows))
    writer.writerows(table_rows(rows))
    document = {
        "recipe": recipe,
        "wall_seconds": seconds,
        "columns": columns(rows),
        "runs": _clean([{k: v for k, v in row.items() if k != "train_config"} for row in rows]),
    }
    paths = []
    for name, text in (
        ("results.md", md),
        ("results.csv", buffer.getvalue()),
        ("results.json", json.dumps(document, indent=2) + "\n"),
    ):
        paths.append(write_atomic(out / name, lambda f, t=text: f.write(t.encode()), what="report"))
    paths.append(plot(out / PLOT, rows, curves))
    if any(row.get("quality_curve") for row in rows):
        quality = f"{recipe.get('name', 'recipe')}: sample quality on {recipe.get('data', '?')}"
        paths.append(quality_plot(out / QUALITY_PLOT, rows, quality))
    return paths


def _sig(value: Any) -> str:
    """``value`` to 3 significant digits (seconds per image span 1e-5 to 1)."""
    return "" if value is None else f"{value:.3g}"


def quality_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines: each run's sample quality at each sampling cost (its ``quality_curve``)."""
    rows = [r for r in rows if r.get("quality_curve")]
    if not rows:
        return []
    names = [n for n in ("fid", "kid", "precision", "recall") if n in rows[0]["quality_curve"][0]]
    lines = [
        "",
        "## Sample quality against sampling cost",
        "",
        "| run | sampling steps | s/image | " + " | ".join(names) + " |",
        "|---|---|---|" + "|".join("---" for _ in names) + "|",
    ]
    for row in rows:
        for p in row["quality_curve"]:
            cells = []
            for n in names:
                std = p.get(f"{n}_std")
                cells.append(_num(p.get(n), 3) + (f" ± {_num(std, 3)}" if std is not None else ""))
            steps = "one sampler" if p.get("steps") is None else str(p["steps"])
            lines.append(
                f"| {row['run']} | {steps} | {_sig(p.get('seconds_per_image'))} | "
                + " | ".join(cells)
                + " |"
            )
    return lines


def quality_plot(path: Path, rows: Sequence[dict[str, Any]], title: str) -> Path:
    """FID against the seconds per sampled image, as in the DDIM paper: a line through a VDM's
    step counts (each point labelled), one point for a model with one sampler cost; PNG,
    written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=110)
    for row in rows:
        points = [p for p in row.get("quality_curve") or [] if p.get("fid") is not None]
        if not points:
            continue
        xs = [p["seconds_per_image"] for p in points]
        ys = [p["fid"] for p in points]
        (line,) = ax.plot(xs, ys, marker="o", ms=4, label=row["run"])
        for p, x, y in zip(points, xs, ys, strict=True):
            if p.get("steps") is not None:
                ax.annotate(str(p["steps"]), (x, y), textcoords="offset points", xytext=(3, 3),
                            fontsize=7, color=line.get_color())  # fmt: skip
        floor = ((row.get("sample_metrics") or {}).get("floor") or {}).get("fid")
        if floor and floor.get("value") is not None:
            ax.axhline(floor["value"], color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("sampling seconds per image (labels: sampling steps)")
    ax.set_ylabel("FID (dotted: the floor, train vs test)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def plot(path: Path, rows: Sequence[dict[str, Any]], title: str) -> Path:
    """Bits/dim against training seconds with ``se`` error bars, one line per run: its
    periodic evaluations (on the validation split when the recipe holds one out), and a star
    for its final test evaluation at the training time of the weights it evaluated (the best
    step with ``keep_best``); PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=110)
    for row in rows:
        points = [p for p in row.get("curve", []) if p.get("bits_per_dim") is not None]
        curve = [p for p in points if p.get("split") != "test"]
        held = "validation" if any(p.get("split") == "validation" for p in curve) else "test"
        line = None
        if curve:
            xs = [p["train_seconds"] for p in curve]
            ys = [p["bits_per_dim"] for p in curve]
            err = [p["se"] if p.get("se") is not None else 0.0 for p in curve]
            line = ax.errorbar(
                xs, ys, yerr=err, marker="o", ms=3, capsize=2, label=f"{row['run']} ({held})"
            )
        finals = [p for p in points if p.get("split") == "test"]
        if finals:  # the test evaluation, at the time of the weights it evaluated
            best = row.get("best_step")
            at = [p["train_seconds"] for p in curve if p["step"] == best] or [
                finals[-1]["train_seconds"]
            ]
            colour = line[0].get_color() if line is not None else None
            ax.errorbar(
                at[-1:], [finals[-1]["bits_per_dim"]], yerr=[finals[-1]["se"] or 0.0],
                marker="*", ms=10, color=colour, linestyle="none", label=f"{row['run']} (test)",
            )  # fmt: skip
    finals = [r["bits_per_dim"] for r in rows if r.get("bits_per_dim") is not None]
    if finals:  # the first evaluations of an untrained model would squash the rest
        ax.set_ylim(bottom=0.9 * min(finals), top=2.0 * max(finals))
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("bits/dim (ELBO bound)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    return _save_figure(fig, path)


def _save_figure(fig: Any, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, written atomically; the figure is closed."""
    from matplotlib import pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    data = buffer.getvalue()
    return write_atomic(path, lambda f: f.write(data), what="plot")
