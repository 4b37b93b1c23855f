"""Plots of a training run: the loss curve, t and b over training, and a heat map of held-out pair probabilities.

Pure functions from logged rows (metrics.jsonl objects) or tensors to PNG files; matplotlib runs headless (Agg).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")       # no display: write files only
    import matplotlib.pyplot as plt

    return plt


def plot_loss(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Training loss against step, from metrics rows with "step" and "loss"."""
    plt = _pyplot()
    points = [(row["step"], row["loss"]) for row in rows if "loss" in row]
    figure, axes = plt.subplots(figsize=(5, 3.2), dpi=120)
    axes.plot([p[0] for p in points], [p[1] for p in points], color="tab:blue", linewidth=1.2)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_yscale("log")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_scale_bias(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """The temperature t = exp(t') and the bias b against step, on two axes sharing the step axis."""
    plt = _pyplot()
    steps = [row["step"] for row in rows if "logit_scale" in row]
    scales = [row["logit_scale"] for row in rows if "logit_scale" in row]
    biases = [row["logit_bias"] for row in rows if "logit_scale" in row]
    figure, axes = plt.subplots(figsize=(5, 3.2), dpi=120)
    axes.plot(steps, scales, color="tab:orange", label="t")
    axes.set_xlabel("step")
    axes.set_ylabel("t (temperature)", color="tab:orange")
    twin = axes.twinx()
    twin.plot(steps, biases, color="tab:green", label="b")
    twin.set_ylabel("b (bias)", color="tab:green")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_pairs(probabilities: torch.Tensor, captions: Sequence[str], path: str | os.PathLike,
               title: str = "held-out pairs") -> None:
    """Heat map of a (k, k) matrix of pair probabilities: row i an image, column j the caption of pair j.

    A model that learned the task shows a bright diagonal on a dark field.
    """
    plt = _pyplot()
    k = len(captions)
    figure, axes = plt.subplots(figsize=(8, 7.2), dpi=110)
    image = axes.imshow(probabilities.detach().cpu().float().numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    axes.set_xticks(range(k))
    axes.set_xticklabels(captions, rotation=60, ha="right", fontsize=6)
    axes.set_yticks(range(k))
    axes.set_yticklabels(captions, fontsize=6)
    axes.set_xlabel("caption")
    axes.set_ylabel("image of")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
