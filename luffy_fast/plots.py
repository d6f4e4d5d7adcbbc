"""`luffy-fast plot`: training curves of one or more runs from their metrics.jsonl, one panel per
metric, one line per run (a run under way can be plotted: a torn last line is left out).

Step metrics are noisy (one batch of prompts per step), so each is drawn smoothed (an
exponential moving average, `--smooth`, as TensorBoard's slider) over its raw values, drawn
faint; validation metrics, logged every `eval.every` steps, are drawn as they are, with markers.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from luffy_fast.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The default panels, in this order, each where some run logged it: validation first (the
# macro average over the held-out benchmarks, the toy task's held-out accuracy), then rollouts
# (rewards of the policy's own samples and of the traces, their lengths), then the update.
DEFAULT_METRICS = ("val/macro/avg@*", "heldout_accuracy", "reward_on_policy", "reward_off_policy",
                   "response_length_on_policy", "entropy", "rollout_entropy", "clip_fraction",
                   "loss", "grad_norm")
# every Nth step or less: drawn with markers and never smoothed
VALIDATION = re.compile(r"^(val/|heldout_)")


def add_plot_parser(commands: argparse._SubParsersAction) -> None:
    plot = commands.add_parser(
        "plot", help="training curves of one or more runs, as a PNG",
        description="Plot the metrics.jsonl of one or more runs (their output.dir), one panel per "
                    "metric and one line per run.")
    plot.add_argument("runs", nargs="+", metavar="RUN",
                      help="a run's output.dir (or its metrics.jsonl)")
    plot.add_argument("--output", default=None,
                      help="the PNG (default: RUN/curves.png for one run, else curves.png)")
    plot.add_argument("--metrics", default=None,
                      help="comma-separated names, `*` as a wildcard (default: validation "
                           "accuracy, rewards, lengths, entropy, clipping, loss and grad_norm)")
    plot.add_argument("--smooth", type=float, default=0.6,
                      help="moving-average weight of step metrics in [0, 1) (default 0.6; 0: off)")


def metrics_file(run: str) -> Path:
    """A run's metrics.jsonl, from its folder or the file itself."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        where = f"{run!r} has no metrics.jsonl" if Path(run).is_dir() else f"no such run: {run!r}"
        raise FileNotFoundError(f"plot: {where} (give a run's output.dir)")
    return path


def run_labels(files: Sequence[Path]) -> list[str]:
    """Each run's folder name, with as many parent folders as it takes to tell them apart."""
    folders = [file.parent.resolve() for file in files]
    for depth in range(1, max(len(folder.parts) for folder in folders) + 1):
        labels = ["/".join(folder.parts[-depth:]) for folder in folders]
        if len(set(labels)) == len(labels):
            return labels
    return [str(file) for file in files]


def chosen_metrics(histories: Sequence[list[dict]], wanted: Optional[str]) -> list[str]:
    """The metric names to plot, in the order asked: patterns with `*` expand to the names some
    run logged (sorted). A name asked for by hand that no run logged is an error naming the
    nearest ones; a default one is left out."""
    logged = sorted({name for history in histories for row in history for name in row
                     if name != "step" and _is_number(row[name])})
    patterns = DEFAULT_METRICS if wanted is None else [
        name.strip() for name in wanted.split(",") if name.strip()]
    if not patterns:
        raise ConfigError("plot --metrics: no metric named")
    names: list[str] = []
    for pattern in patterns:
        found = [name for name in logged if re.fullmatch(
            ".*".join(map(re.escape, pattern.split("*"))), name)]
        if not found and wanted is not None:
            near = [name for name in logged if pattern.split("*")[0].split("/")[0] in name][:8]
            shown = near or logged[:12]
            listed = ", ".join(shown) + (", ..." if len(shown) < len(logged) else "")
            raise ConfigError(f"plot --metrics: no run logged {pattern!r} (logged: "
                              f"{listed or 'nothing yet'})")
        names += [name for name in found if name not in names]
    if not names:
        raise ConfigError("plot: the runs have logged none of the default metrics yet; name "
                          "some with --metrics")
    return names


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def smoothed(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average, debiased as TensorBoard's (the first point is the first
    value, not pulled toward 0)."""
    result, average, total = [], 0.0, 0.0
    for value in values:
        average = weight * average + (1 - weight) * value
        total = weight * total + (1 - weight)
        result.append(average / total)
    return result


def series(history: Sequence[dict], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a metric over a run, without the steps where it is missing or null."""
    points = [(row["step"], float(row[name])) for row in history
              if _is_number(row.get(name)) and math.isfinite(row[name]) and "step" in row]
    return [step for step, _ in points], [value for _, value in points]


def draw(histories: dict[str, list[dict]], names: Sequence[str], smooth: float) -> Figure:
    """The figure: a panel per name (three to a row), a colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.flat, names):
        for i, (label, history) in enumerate(histories.items()):
            steps, values = series(history, name)
            if not steps:
                continue
            color = colors[i % len(colors)]
            if VALIDATION.match(name) or smooth == 0 or len(steps) < 3:
                ax.plot(steps, values, color=color, label=label,
                        marker="o" if VALIDATION.match(name) else None, markersize=3)
            else:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, smoothed(values, smooth), color=color, label=label)
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
        if len(histories) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    figure.tight_layout()
    return figure


def plot_runs(histories: dict[str, list[dict]], names: Sequence[str], path: Path,
              smooth: float) -> Path:
    import matplotlib.pyplot as plt

    figure = draw(histories, names, smooth)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def run_plot(args: argparse.Namespace) -> int:
    """`luffy-fast plot`: checks every input before reading any run, then writes the PNG."""
    from luffy_fast.metrics import read_metrics
    from luffy_fast.run_files import ensure_writable_dir

    if not 0 <= args.smooth < 1:
        raise ConfigError(f"plot --smooth: {args.smooth} is not in [0, 1) (0 turns it off)")
    files = [metrics_file(run) for run in args.runs]
    output = Path(args.output) if args.output else (
        files[0].parent / "curves.png" if len(files) == 1 else Path("curves.png"))
    if output.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ConfigError(f"plot --output: {str(output)!r} is not a .png, .pdf or .svg file")
    if output.is_dir():
        raise ConfigError(f"plot --output: {str(output)!r} is a folder, not a file")
    ensure_writable_dir(output.parent, "plot --output")
    histories = dict(zip(run_labels(files), (read_metrics(file) for file in files)))
    names = chosen_metrics(list(histories.values()), args.metrics)
    plot_runs(histories, names, output, args.smooth)
    last = {label: max((row.get("step", 0) for row in history), default=0)
            for label, history in histories.items()}
    steps = ", ".join(f"{label} to step {step}" for label, step in last.items())
    print(f"plot: {len(names)} metrics of {len(files)} run(s) ({steps}) in {output}",
          file=sys.stderr)
    return 0
