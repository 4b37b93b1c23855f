"""Every study's smoke run through `siglip reproduce`, end to end, checking what its report promises."""

from __future__ import annotations

import json
import re

import pytest

from siglip.cli import main
from siglip.experiments import STUDIES
from siglip.experiments.stats import VERDICTS


def run_smoke(study: str, out, cache, *extra: str) -> dict:
    assert main(["reproduce", study, "--smoke", "--out", str(out), "--cache-dir", str(cache), *extra]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("study", list(STUDIES))
def test_smoke_run_pairs_its_arms_and_prints_chance(study, tmp_path):
    out = tmp_path / study
    results = run_smoke(study, out, tmp_path / "cache")
    text = (out / "report.md").read_text()
    for section in ("## The paper's claim", "## Verdicts", "## What this scale tests", "## The paper's figures",
                    "## Setup", "Smoke run"):
        assert section in text, section
    # Chance is printed in the results tables and drawn in the plots (every plot of ours is a metric's plot).
    assert re.search(r"^\| chance", text, flags=re.MULTILINE)
    images = re.findall(r"\]\(([^)]+\.png)\)", text)
    assert images and all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in images)
    # Every arm ran on every seed, and the arms of a seed that consumed equal examples saw the same batches.
    arms = {arm["name"]: arm for arm in results["arms"]}
    trials = results["trials"]
    assert len(trials) == len(arms) * len(results["seeds"]) and len(results["seeds"]) >= 2
    for seed in results["seeds"]:
        by_examples: dict[int, set[str]] = {}
        for trial in trials:
            if trial["seed"] == seed:
                arm = arms[trial["arm"]]
                by_examples.setdefault(arm["batch_size"] * arm["steps"], set()).add(trial["order_digest"])
        assert all(len(digests) == 1 for digests in by_examples.values()), f"seed {seed}: arms saw other orders"
    first, second = results["seeds"][:2]
    digests = {seed: {t["order_digest"] for t in trials if t["seed"] == seed} for seed in (first, second)}
    assert not digests[first] & digests[second], "two seeds must draw different orders"
    for comparison in results["comparisons"]:
        assert comparison["verdict"] in (*VERDICTS, "-") and len(comparison["differences"]) == len(results["seeds"])


@pytest.mark.slow
def test_worker_processes_give_the_same_numbers():
    from siglip.experiments.design import Arm, Scale, Study
    from siglip.experiments.runner import run_trials

    study = Study(name="tiny", title="", claim="", paper=[], arms=[Arm("a", 4, 2), Arm("b", 8, 1, loss="softmax")],
                  comparisons=[], scope="", seeds=(0, 1), scale=Scale(pool_size=8, corpus_size=64, test_size=8))
    in_process, _ = run_trials(study, workers=1)
    spawned, _ = run_trials(study, workers=2)
    for arm in ("a", "b"):
        for one, two in zip(in_process[arm], spawned[arm], strict=True):
            assert (one.seed, one.metrics, one.curves, one.order_digest) == (two.seed, two.metrics, two.curves,
                                                                                two.order_digest)


def test_bad_flags_are_user_errors(capsys):
    assert main(["reproduce", "no-such-study"]) == 2
    assert "batch-size" in capsys.readouterr().err
    assert main(["reproduce", "init", "--smoke", "--seeds", "0"]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
