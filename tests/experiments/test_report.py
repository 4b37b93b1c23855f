"""siglip.experiments.report: the Markdown and the plots, on made-up numbers."""

from __future__ import annotations

import pytest
import torch

from siglip.experiments.report import Plot, Report, Series, Table, markdown_table, plot_figure, write_report


def test_every_plot_draws_its_chance_line():
    chance = float(torch.empty(()).uniform_(1, 50))
    for bars in (False, True):
        plot = Plot("p.png", "t", "x", "y", [Series("a", [0, 1], [60.0, 70.0], [1.0, 2.0])], chance=chance, bars=bars)
        axes = plot_figure(plot).axes[0]
        lines = [line for line in axes.get_lines() if line.get_label() == "chance"]
        assert len(lines) == 1 and list(lines[0].get_ydata()) == [chance, chance]


def test_a_categorical_axis_names_its_positions():
    labels = ["clean", "image", "shuffle"]
    plot = Plot("p.png", "t", "x", "y", [Series("a", [0, 1, 2], [60.0, 50.0, 40.0])], chance=10.0,
                xticklabels=labels)
    axes = plot_figure(plot).axes[0]
    assert list(axes.get_xticks()) == [0, 1, 2]
    assert [tick.get_text() for tick in axes.get_xticklabels()] == labels


def test_report_writer_writes_markdown_pngs_and_json(tmp_path):
    report = Report(
        study="made-up", title="A made-up study", claim="The paper says x.", verdicts=["**reproduced**: x"],
        scope="Some of it.", setup=["one line"],
        paper=[("Table 1 of the paper.", Table("", ["b"], [["9"]]), None)],
        tables=[Table("numbers", ["a", "b"], [["1", "2"], ["3", "4"]], note="a note")],
        plots=[Plot("curve.png", "curve", "step", "loss", [Series("s", [0, 1, 2], [3.0, 2.0, 1.0], [0.1] * 3)],
                    chance=2.5)],
        results={"trials": [{"seed": 0}]}, smoke=True, seconds=12.0, load=(1.0, 2.0, 3.0),
    )
    path = write_report(report, tmp_path / "out")
    text = path.read_text()
    assert "| a | b |" in text and "| 3 | 4 |" in text and "Smoke run" in text and "**reproduced**: x" in text
    assert "Table 1 of the paper." in text and "| 9 |" in text and "load average 1.0 at the start" in text
    assert (tmp_path / "out" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](curve.png)" in text
    assert (tmp_path / "out" / "results.json").read_text().startswith("{")


def test_a_ragged_table_is_refused():
    with pytest.raises(ValueError, match="has 1 cells, expected 2"):
        markdown_table(["a", "b"], [["only one"]])


def test_results_json_round_trips_with_one_trial_a_line():
    import json

    from siglip.experiments.report import results_text

    trials = [{"arm": f"a{index}", "seed": index, "metrics": {"zeroshot": float(torch.rand(()))}} for index in range(3)]
    for results in ({}, {"study": "x"}, {"trials": trials}, {"study": "x", "seeds": [0, 1, 2], "trials": trials}):
        text = results_text(results)
        assert json.loads(text) == results
        if "trials" in results:
            assert sum(line.lstrip().startswith('{"arm"') for line in text.splitlines()) == len(trials)
