"""Run a `Study`: every arm on every seed, then every comparison's paired interval and verdict.

A seed is the unit of work: one process prepares that seed's data once (and the locked tower's features, if an arm
needs them) and runs every arm on it in turn, so the arms of a seed share their data exactly. Seeds run in worker
processes (`workers`), each with `threads` torch threads: on a shared 2-core machine two single-threaded processes
lose little when another job takes a core, where two threads of one process wait on each other's barriers. A trial's
numbers do not depend on which process ran it (same seed, same single thread, same operations).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from siglip.experiments.design import HEADLINE, LOCKED, Arm, Comparison, Results, Scale, Study, TrialResult
from siglip.experiments.stats import NOT_TESTED, Interval, learned, t_interval, verdict
from siglip.experiments.trial import build_arm_model, embed, log, run_trial


@dataclass(frozen=True)
class SeedJob:
    """Everything a worker process needs to run one seed of a study (picklable)."""

    seed: int
    arms: tuple[Arm, ...]
    scale: Scale
    tower_path: str | None
    threads: int


@dataclass
class Outcome:
    """A comparison's result: the per-seed differences, their interval, the verdict and why."""

    comparison: Comparison
    differences: list[float]
    interval: Interval
    verdict: str
    """"reproduced", "not reproduced", "not tested", or "-" for a comparison the paper does not predict."""
    reason: str


def run_seed(job: SeedJob) -> list[TrialResult]:
    """Every arm of the study on one seed, in the study's order (the body of a worker process)."""
    from safetensors.torch import load_file

    from siglip.experiments.prepared import prepare_data

    torch.set_num_threads(job.threads)
    tower_state = load_file(job.tower_path) if job.tower_path else None
    datasets, features, results = {}, {}, []
    for arm in job.arms:
        source = arm.data or job.scale.data
        if source not in datasets:
            datasets[source] = prepare_data(job.scale, job.seed, source_name=source)
        locked = None
        if arm.image_tower == LOCKED:
            if source not in features:
                features[source] = tower_features(arm, datasets[source], job.scale.preset, tower_state)
            locked = features[source]
        results.append(run_trial(arm, job.seed, datasets[source], preset=job.scale.preset, tower_state=tower_state,
                                 locked_features=locked))
    return results


def tower_features(arm: Arm, data, preset: str, tower_state) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool (N, d), test (M, d)) image features of the locked tower, computed once per seed and source."""
    from siglip.model import encode_images

    model = build_arm_model(arm, 0, data, preset, tower_state).eval()
    return embed(encode_images, model, data.pixel_values), embed(encode_images, model, data.test_pixel_values)


def run_trials(study: Study, *, workers: int = 1, threads: int = 1,
               cache_dir: str | None = None) -> tuple[Results, list[str]]:
    """Train every arm on every seed.

    Returns:
        Arm name -> its trials in seed order, and lines for the report's setup (where the tower came from).
    """
    tower_path, notes = None, []
    if any(arm.image_tower == LOCKED for arm in study.arms):
        from siglip.experiments.tower import pretrained_image_tower

        if study.tower is None:
            raise ValueError(f"study {study.name!r} has locked arms but no tower spec")
        tower = pretrained_image_tower(study.tower, cache_dir)
        how = "loaded from the cache" if tower.cache_hit else "pretrained by this run"
        notes.append(f"Pretrained image tower: `{tower.path.name}` ({how} in {tower.seconds:.0f} s; supervised "
                     f"accuracy on its last training batches {100 * tower.train_accuracy:.1f}%)")
        tower_path = str(tower.path)
    jobs = [SeedJob(seed, tuple(study.arms), study.scale, tower_path, threads) for seed in study.seeds]
    log(f"{study.name}: {len(study.arms)} arms x {len(jobs)} seeds on {min(workers, len(jobs))} process(es)")
    if workers <= 1 or len(jobs) == 1:
        per_seed = [run_seed(job) for job in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")     # no forked OpenMP state; each worker imports afresh
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
            per_seed = list(pool.map(run_seed, jobs))
    results: dict[str, list[TrialResult]] = {arm.name: [] for arm in study.arms}
    for seed_results in per_seed:
        for result in seed_results:
            results[result.arm].append(result)
    if study.measures is not None:
        for trials in results.values():
            for result in trials:
                result.metrics.update(study.measures(result))
    return results, notes


def values(results: Results, arm: str, metric: str) -> list[float]:
    """One metric of one arm, a value per seed (NaN where the trial did not measure it)."""
    return [result.metrics.get(metric, math.nan) for result in results[arm]]


def chance_of(results: Results, arm: str, metric: str = HEADLINE) -> float:
    """The chance level of `metric` for `arm` (NaN where none is defined, e.g. a loss)."""
    return results[arm][0].chance.get(metric, math.nan)


def compare(comparison: Comparison, results: Results) -> Outcome:
    """The paired differences of a comparison over seeds, their interval and the verdict (see `stats`)."""
    per_seed = [0.0] * len(results[comparison.plus[0]])
    for sign, arms in ((1.0, comparison.plus), (-1.0, comparison.minus)):
        for arm in arms:
            per_seed = [total + sign * value for total, value in
                        zip(per_seed, values(results, arm, comparison.metric), strict=True)]
    interval = t_interval(per_seed)
    must_learn = comparison.arms if comparison.must_learn is None else comparison.must_learn
    for arm in must_learn:
        chance = chance_of(results, arm)
        if not learned(values(results, arm, HEADLINE), chance):
            return Outcome(comparison, per_seed, interval, NOT_TESTED,
                           f"'{arm}' did not learn: its {HEADLINE} accuracy is not clearly above chance "
                           f"({100 * chance:.1f}%) over its seeds")
    reason = comparison.condition(results) if comparison.condition is not None else None
    if reason:
        return Outcome(comparison, per_seed, interval, NOT_TESTED, reason)
    if not comparison.predicted:
        return Outcome(comparison, per_seed, interval, "-", "not a prediction of the paper; shown for reference")
    factor = 100 if comparison.percent else 1
    line = "zero" if comparison.margin == 0 else f"-{factor * comparison.margin:g}" + (
        " points" if comparison.percent else "")
    word, why = verdict(interval, margin=comparison.margin, line_name=line)
    return Outcome(comparison, per_seed, interval, word, why)


def load_average() -> float:
    """The machine's one-minute load average now."""
    return os.getloadavg()[0]


def default_workers(study: Study) -> int:
    """One process per seed, as many as the machine has cores (one for a smoke run: it is over before a spawn)."""
    return 1 if study.smoke else max(1, min(len(study.seeds), os.cpu_count() or 1))

