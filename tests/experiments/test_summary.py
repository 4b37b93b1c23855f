"""siglip.experiments.summary: the shared tables and plots carry chance, results.json carries every trial."""

from __future__ import annotations

import json

import torch

from siglip.experiments.design import Arm, Comparison, PaperFigure, Study, TrialResult
from siglip.experiments.report import write_report
from siglip.experiments.runner import compare
from siglip.experiments.summary import build_report, downsample, format_mean


def made_up(study: Study) -> dict[str, list[TrialResult]]:
    chance = {"zeroshot": 0.25, "zeroshot/color": 0.125, "zeroshot/shape": 1 / 6, "zeroshot/count": 1 / 3,
              "i2t_r1": 0.02, "t2i_r1": 0.02}
    results = {}
    for arm in study.arms:
        results[arm.name] = []
        for seed in study.seeds:
            metrics = {key: float(torch.empty(()).uniform_(value, 1.0)) for key, value in chance.items()}
            metrics["final_loss"] = float(torch.rand(()))
            curve = torch.rand(1000).tolist()
            results[arm.name].append(TrialResult(arm.name, seed, metrics, chance, {"loss": curve}, 1.0, False,
                                                 f"digest-{seed}", 0.5))
    return results


def test_tables_and_plots_print_chance_and_results_json_holds_every_trial(tmp_path):
    study = Study(name="made-up", title="A made-up study", claim="The paper says x.",
                  paper=[PaperFigure("Table 9 of nowhere.", ["a"], [["1"]])],
                  arms=[Arm("one", 8, 2), Arm("two", 8, 2, loss="softmax")],
                  comparisons=[Comparison("one beats two", plus=("one",), minus=("two",))], scope="All of it.",
                  seeds=(0, 1, 2, 3))
    results = made_up(study)
    outcomes = [compare(comparison, results) for comparison in study.comparisons]
    report = build_report(study, results, outcomes, command="siglip reproduce made-up", setup=["a line"])
    arms, tasks = report.tables[1], report.tables[2]
    assert arms.rows[0][0] == "chance (shapes)" and arms.rows[0][2] == "25.0"
    assert tasks.rows[0] == ["chance", "12.5", "16.7", "33.3"]
    assert all(plot.chance is not None for plot in report.plots)
    path = write_report(report, tmp_path / "out")
    text = path.read_text()
    assert "Table 9 of nowhere." in text and "## Verdicts" in text and "| chance (shapes) |" in text
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(data["trials"]) == 8 and data["comparisons"][0]["differences"] == outcomes[0].differences
    assert {trial["order_digest"] for trial in data["trials"] if trial["seed"] == 2} == {"digest-2"}
    assert data["trials"][0]["curves"]["loss"]["stride"] == 3
    for name in [plot.filename for plot in report.plots]:
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_downsample_takes_window_means():
    curve = torch.rand(10).tolist()
    points, stride = downsample(curve, points=4)
    assert stride == 3 and len(points) == 4
    assert abs(points[0] - sum(curve[:3]) / 3) < 1e-5 and abs(points[-1] - curve[9]) < 1e-5
    assert downsample(curve, points=20) == ([round(value, 5) for value in curve], 1)


def test_format_mean():
    assert format_mean([0.5, 0.7], percent=True) == "60.0 ± 14.1"
    assert format_mean([0.25]) == "0.2" and format_mean([float("nan"), 1.0]) == "diverged"
