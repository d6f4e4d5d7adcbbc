"""`luffy-fast plot`: the curves drawn are the runs' logged values (smoothed as computed by hand),
and bad input is one line naming it."""

from __future__ import annotations

import json
import re

import pytest

from luffy_fast.cli import main
from luffy_fast.errors import ConfigError
from luffy_fast.plots import chosen_metrics, draw, run_labels, series, smoothed


def write_run(folder, rows, torn: str = ""):
    folder.mkdir(parents=True)
    text = "".join(json.dumps(row) + "\n" for row in rows) + torn
    (folder / "metrics.jsonl").write_text(text)
    return folder


RUN = [{"step": 1, "loss": 1.0, "reward_on_policy": 0.0, "grad_norm": 2.0},
       {"step": 2, "loss": 3.0, "reward_on_policy": 0.5, "grad_norm": None,
        "val/macro/avg@4": 0.25, "val/aime24/avg@4": 0.1},
       {"step": 3, "loss": 2.0, "reward_on_policy": 1.0, "grad_norm": 4.0}]


def test_smoothing_by_hand():
    # weight 0.5: 1; (0.5·0.5·1 + 0.5·3) / (1 - 0.25) = 7/3; debiased, the first point is the value
    assert smoothed([1.0, 3.0], 0.5) == pytest.approx([1.0, 7 / 3])
    assert smoothed([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert smoothed([1.0, 3.0], 0.0) == [1.0, 3.0]


def test_series_leaves_out_missing_and_null_values():
    assert series(RUN, "grad_norm") == ([1, 3], [2.0, 4.0])
    assert series(RUN, "val/macro/avg@4") == ([2], [0.25])
    # a non-finite value (a diverged step) and a row without a step are left out too
    rows = [{"step": 1, "loss": float("nan")}, {"loss": 5.0}, {"step": 3, "loss": float("inf")},
            {"step": 4, "loss": 2.0}]
    assert series(rows, "loss") == ([4], [2.0])


def test_the_metrics_chosen():
    # the defaults in their order, where logged; wildcards expand to every name they match
    assert chosen_metrics([RUN], None) == ["val/macro/avg@4", "reward_on_policy", "loss",
                                           "grad_norm"]
    assert chosen_metrics([RUN], "val/*, loss") == ["val/aime24/avg@4", "val/macro/avg@4",
                                                   "loss"]
    with pytest.raises(ConfigError, match=r"plot --metrics: no run logged 'entropy'"):
        chosen_metrics([RUN], "loss,entropy")
    with pytest.raises(ConfigError, match="none of the default metrics"):
        chosen_metrics([[{"step": 1, "tokens_per_second": 3.0}]], None)
    # "*": every logged number but the step (not text, not flags); a name asked for twice once
    noted = [{**RUN[0], "note": "warm-up", "resumed": True}]
    assert chosen_metrics([noted], "*") == ["grad_norm", "loss", "reward_on_policy"]
    assert chosen_metrics([RUN], "loss, lo*, loss") == ["loss"]
    with pytest.raises(ConfigError, match="plot --metrics: no metric named"):
        chosen_metrics([RUN], " , ")


def test_an_unlogged_name_lists_the_nearest_logged_ones():
    """Those sharing the name's first word (before `*` and `/`), else every logged name; "..."
    only when some are left out."""
    logged = "grad_norm, loss, reward_on_policy, val/aime24/avg@4, val/macro/avg@4"
    with pytest.raises(ConfigError) as error:
        chosen_metrics([RUN], "entropy")
    assert str(error.value) == f"plot --metrics: no run logged 'entropy' (logged: {logged})"
    with pytest.raises(ConfigError) as error:
        chosen_metrics([RUN], "val/math500*")
    assert str(error.value) == ("plot --metrics: no run logged 'val/math500*' (logged: "
                                "val/aime24/avg@4, val/macro/avg@4, ...)")


def test_runs_are_labelled_by_as_many_folders_as_tell_them_apart(tmp_path):
    files = [tmp_path / "a" / "luffy" / "metrics.jsonl", tmp_path / "b" / "luffy" / "metrics.jsonl",
             tmp_path / "b" / "grpo" / "metrics.jsonl"]
    assert run_labels(files) == ["a/luffy", "b/luffy", "b/grpo"]
    assert run_labels(files[1:]) == ["luffy", "grpo"]


def test_the_drawn_lines_are_the_logged_values():
    other = [{**row, "loss": 10 * row["loss"]} for row in RUN]
    figure = draw({"luffy": RUN, "grpo": other}, ["loss", "val/macro/avg@4"], smooth=0.5)
    loss_ax, val_ax = figure.axes[:2]
    # per run: the raw values, faint, then the smoothed line, labelled
    raw, smooth, other_raw, other_smooth = loss_ax.get_lines()
    assert list(raw.get_xdata()) == [1, 2, 3] and list(raw.get_ydata()) == [1.0, 3.0, 2.0]
    assert list(smooth.get_ydata()) == pytest.approx(smoothed([1.0, 3.0, 2.0], 0.5))
    assert smooth.get_label() == "luffy" and other_smooth.get_label() == "grpo"
    assert list(other_raw.get_ydata()) == [10.0, 30.0, 20.0]
    # validation: never smoothed, with markers
    [line, other_line] = val_ax.get_lines()
    assert list(line.get_ydata()) == [0.25] and line.get_marker() == "o"


def test_short_series_and_smoothing_off_draw_the_values_once():
    """Fewer than 3 points, or --smooth 0: one line per run, the values themselves."""
    two = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 3.0}]
    [line] = draw({"luffy": two}, ["loss"], smooth=0.5).axes[0].get_lines()
    assert list(line.get_ydata()) == [1.0, 3.0]
    [line] = draw({"luffy": RUN}, ["loss"], smooth=0.0).axes[0].get_lines()
    assert list(line.get_ydata()) == [1.0, 3.0, 2.0] and line.get_alpha() is None


def test_validation_metrics_are_never_smoothed():
    """Three validation points with --smooth 0.5: one line, the values, with markers."""
    run = [{"step": 10 * i, "val/macro/avg@4": value} for i, value in enumerate((0.5, 0.0, 1.0))]
    [line] = draw({"luffy": run}, ["val/macro/avg@4"], smooth=0.5).axes[0].get_lines()
    assert list(line.get_xdata()) == [0, 10, 20] and list(line.get_ydata()) == [0.5, 0.0, 1.0]
    assert line.get_marker() == "o" and line.get_alpha() is None


def test_the_panels_three_to_a_row_with_a_legend_for_several_runs():
    names = ["loss", "reward_on_policy", "grad_norm", "val/macro/avg@4"]
    figure = draw({"luffy": RUN}, names, smooth=0.5)
    # 4 panels: 2 rows of 3, the last 2 hidden; one run: no legend
    assert [ax.get_title() for ax in figure.axes] == names + ["", ""]
    assert [ax.get_visible() for ax in figure.axes] == [True] * 4 + [False] * 2
    assert figure.axes[0].get_subplotspec().get_geometry()[:2] == (2, 3)
    assert all(ax.get_legend() is None for ax in figure.axes)
    two_runs = draw({"luffy": RUN, "grpo": RUN}, names, smooth=0.5)
    assert [t.get_text() for t in two_runs.axes[0].get_legend().get_texts()] == ["luffy", "grpo"]


def test_plot_command_writes_the_png(tmp_path, capsys):
    luffy = write_run(tmp_path / "luffy", RUN, torn='{"step": 4, "lo')  # a run under way
    grpo = write_run(tmp_path / "grpo", RUN[:2])
    output = tmp_path / "out" / "curves.png"
    with pytest.warns(RuntimeWarning, match="line 4 is not a complete JSON object"):
        assert main(["plot", str(luffy), str(grpo / "metrics.jsonl"), "--output", str(output)]) == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4 metrics of 2 run(s) (luffy to step 3, grpo to step 2)" in capsys.readouterr().err
    assert main(["plot", str(grpo)]) == 0 and (grpo / "curves.png").is_file()  # one run: beside it
    # unsmoothed, as an SVG
    assert main(["plot", str(grpo), "--smooth", "0", "--output", str(tmp_path / "c.svg")]) == 0
    assert b"<svg" in (tmp_path / "c.svg").read_bytes()[:400]


@pytest.mark.parametrize("step", ["2", None, [2], 2.5, True])
def test_rows_whose_step_is_not_an_integer_are_dropped(tmp_path, capsys, step):
    run = write_run(tmp_path / "run", [RUN[0], {**RUN[1], "step": step}, RUN[2]])
    with pytest.warns(RuntimeWarning, match=re.escape(
            f"line 2 has a step that is not an integer ({step!r}); dropped")):
        assert main(["plot", str(run), "--metrics", "loss"]) == 0
    assert "1 metrics of 1 run(s) (run to step 3)" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["nowhere"], "plot: no such run: 'nowhere'"),
    (["{empty}"], "has no metrics.jsonl"),
    (["{run}", "--smooth", "1"], r"plot --smooth: 1.0 is not in \[0, 1\)"),
    (["{run}", "--output", "curves.txt"], "plot --output: 'curves.txt' is not a .png"),
    # a file where its folder would be; a folder /proc takes no new one in, even from root
    (["{run}", "--output", "{run}/metrics.jsonl/curves.png"],
     r"plot --output: '\S+/metrics.jsonl' cannot be a folder: '\S+/metrics.jsonl' is a file"),
    (["{run}", "--output", "/proc/luffy-fast-test/curves.png"],
     "plot --output: '/proc/luffy-fast-test' is not writable"),
    (["{run}", "--output", "{empty}.png"], r"plot --output: '\S+/empty.png' is a folder, not "
                                          "a file"),
    (["{run}", "--metrics", "entropy"], "plot --metrics: no run logged 'entropy'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, arguments, message):
    run = write_run(tmp_path / "run", RUN)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.png").mkdir()
    words = [word.format(run=run, empty=tmp_path / "empty") for word in arguments]
    assert main(["plot", *words]) == 2
    error = capsys.readouterr().err
    assert error.startswith("luffy-fast: ") and "Traceback" not in error
    assert len(re.findall(message, error)) == 1
    assert not (run / "curves.png").exists()
