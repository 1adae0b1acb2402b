"""The loss curve of a run, drawn from its metrics.jsonl (training and eval loss by step)."""

from __future__ import annotations

import json
from pathlib import Path

from lora_cli.files.atomic import staged_file

METRICS_FILE = "metrics.jsonl"  # every log of `lora train` (one JSON record a line) in its output_dir


def read_metrics(metrics_file: Path) -> list[dict]:
    """The records of a metrics.jsonl, oldest first; none when it does not exist."""
    if not Path(metrics_file).is_file():
        return []
    return [json.loads(line) for line in Path(metrics_file).read_text(encoding="utf-8").splitlines() if line.strip()]


def loss_series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in points], [v for _, v in points]


def plot_losses(metrics_file: Path, out_png: Path) -> Path | None:
    """Write the PNG and return its path; None when matplotlib is missing or nothing was logged."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on training machines
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics_file)
    train_steps, train_loss = loss_series(records, "loss")
    eval_steps, eval_loss = loss_series(records, "eval_loss")
    if not train_steps and not eval_steps:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train_steps:
        ax.plot(train_steps, train_loss, label="train loss")
    if eval_steps:
        ax.plot(eval_steps, eval_loss, marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with staged_file(Path(out_png)) as tmp:  # a reader never sees half a PNG
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(out_png)
