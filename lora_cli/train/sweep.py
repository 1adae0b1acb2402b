"""`lora sweep`: the guide's exponential rank sweep. The same recipe is trained at each rank
(alpha following the recipe's alpha / r), each run in its own folder under output_dir, and the
final loss is compared to find the knee: the smallest rank after which doubling the rank no
longer buys a meaningful improvement.

A run counts as finished when `lora train` finished it (checkpoint.run_finished) and the result
record this module writes after it is there; an interrupted sweep keeps those, and running the
same command again skips them. A finished run made from a different recipe is never reused silently.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from lora_cli.train.checkpoint import run_finished
from lora_cli.files import atomic, ownership
from lora_cli.errors import LoraError
from lora_cli.model.methods import RANKED, method_of
from lora_cli.train.metrics import METRICS_FILE, read_metrics
from lora_cli.files.inputs import read_json
from lora_cli.recipe.schema import Recipe
from lora_cli.data.sources import data_paths
from lora_cli.tasks.hooks import prepare_recipe
from lora_cli.ui.terminal import plain, table_box

RESULT_FILE = "sweep_result.json"  # written into each rank's folder once its run has finished
SUMMARY_FILE = "sweep.json"
PLOT_FILE = "sweep.png"


@dataclass
class RankRun:
    rank: int
    alpha: float
    output_dir: str
    trainable: int
    total: int
    loss: float | None
    loss_kind: str       # "eval" or "train": which loss `loss` is
    steps: int
    reused: bool = False  # finished by an earlier invocation


@dataclass
class SweepResult:
    runs: list[RankRun]
    knee: int | None
    threshold: float
    plot: Path | None = None

    def gains(self) -> dict[int, float | None]:
        """Relative loss improvement per doubling from each rank to the next."""
        return dict(zip([r.rank for r in self.runs], improvement_per_doubling(self.runs)))


# --------------------------------------------------------------------------- parsing

def parse_ranks(text: str) -> list[int]:
    """'4,8,16' -> [4, 8, 16] (sorted, unique)."""
    try:
        ranks = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise LoraError(f"--ranks {text!r}: expected whole numbers separated by commas",
                        "e.g. --ranks 4,8,16,32,64") from None
    if not ranks or any(r < 1 for r in ranks):
        raise LoraError(f"--ranks {text!r}: every rank must be at least 1", "e.g. --ranks 4,8,16,32,64")
    return sorted(set(ranks))


# --------------------------------------------------------------------------- one rank

def rank_recipe(recipe: Recipe, rank: int) -> Recipe:
    """The recipe at `rank`: alpha keeps the recipe's alpha / r (rsLoRA already normalises by
    sqrt(r), so there alpha stays as it is); output goes to output_dir/r{rank}."""
    alpha = recipe.lora.alpha if method_of(recipe).rslora_scaling else recipe.lora.alpha / recipe.lora.r * rank
    train = recipe.train
    if train.max_steps > 0 and not train.eval_steps:
        # Evaluate at the last step, so each rank is judged on its final adapter.
        train = dataclasses.replace(train, eval_steps=train.max_steps)
    return dataclasses.replace(recipe, lora=dataclasses.replace(recipe.lora, r=rank, alpha=alpha), train=train,
                               output_dir=str(Path(recipe.output_dir) / f"r{rank}"))


def _comparable(recipe: Recipe) -> dict:
    d = recipe.to_dict()
    d.pop("output_dir")
    return json.loads(json.dumps(d, default=str))


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def finished_run(recipe: Recipe) -> RankRun | None:
    """The record of a finished run in recipe.output_dir, or None. Refuses a finished run that
    was trained from a different recipe: reusing it would compare unlike runs."""
    folder = Path(recipe.output_dir)
    record_file = folder / RESULT_FILE
    if not run_finished(folder) or not record_file.is_file():
        return None
    record = read_json(record_file, "sweep record")
    if not isinstance(record, dict):
        raise LoraError(f"sweep record {record_file}: not a JSON object", "delete that folder to train that rank again")
    changed = _differences(record.get("recipe", {}), _comparable(recipe))
    if changed:
        raise LoraError(f"{folder} holds a finished run made with a different recipe (changed: {', '.join(changed)})",
                        "sweep into a new output_dir (--set output_dir=...), or delete that folder to rerun it")
    run = RankRun(**{f.name: record[f.name] for f in dataclasses.fields(RankRun) if f.name in record})
    run.reused = True
    return run


def final_loss(output_dir: Path) -> tuple[float | None, str]:
    """(last eval loss, 'eval') when the run evaluated, else (last training loss, 'train')."""
    records = read_metrics(output_dir / METRICS_FILE)
    for key, kind in (("eval_loss", "eval"), ("loss", "train")):
        values = [r[key] for r in records if key in r]
        if values:
            return float(values[-1]), kind
    return None, "train"


def train_rank(recipe: Recipe, console: Console) -> RankRun:
    # imported here: the run pulls in transformers, whose typing unions change how the schema's
    # types print when evaluated after it (test_cli's README check); tests stand in for run_training
    from lora_cli.train import run as train_module

    result = train_module.run_training(recipe, overwrite=True, console=console)
    loss, kind = final_loss(Path(recipe.output_dir))
    run = RankRun(recipe.lora.r, recipe.lora.alpha, recipe.output_dir, result.trainable, result.total,
                  loss, kind, result.steps)
    record = {**dataclasses.asdict(run), "recipe": _comparable(recipe)}
    record.pop("reused")
    # Written last: its presence is what marks the run finished; part of the run it describes.
    ownership.claim(Path(recipe.output_dir), "train", [RESULT_FILE])
    atomic.write_text(Path(recipe.output_dir) / RESULT_FILE, json.dumps(record, indent=2))
    return run


# --------------------------------------------------------------------------- the knee

def improvement_per_doubling(runs: list[RankRun]) -> list[float | None]:
    """For each run but the last: (loss_i - loss_next) / loss_i, divided by the number of
    doublings between the two ranks; None where a loss is missing."""
    gains: list[float | None] = []
    for a, b in zip(runs, runs[1:]):
        if a.loss is None or b.loss is None or a.loss <= 0:
            gains.append(None)
            continue
        gains.append((a.loss - b.loss) / a.loss / math.log2(b.rank / a.rank))
    return gains


def find_knee(runs: list[RankRun], threshold: float) -> int | None:
    """The smallest rank from which every further doubling improves the loss by less than
    `threshold` (relative). None when the largest step still gains that much (sweep higher),
    or when there are fewer than two ranks to compare."""
    gains = improvement_per_doubling(runs)
    knee = None
    for run, gain in reversed(list(zip(runs, gains))):
        if gain is None or gain >= threshold:
            break
        knee = run.rank
    return knee


# --------------------------------------------------------------------------- the sweep

def check_sweep_outputs(recipe: Recipe, plot: Path | None, force: bool, recipe_path: str | Path | None) -> Path:
    """The one output check (lora_cli.files.ownership) for what the sweep writes besides its runs:
    its summary and plot (the default ones in output_dir are its own to replace on a rerun; a
    --plot elsewhere needs --force to replace a plot of an earlier sweep). None may be, hold or
    sit inside the recipe, the base or the data. Returns the plot path."""

    inputs = [("recipe", recipe_path), ("base model (model.name_or_path)", recipe.model.name_or_path)]
    inputs += [("training data (data.path)", p) for p in data_paths(recipe.data.path)]
    inputs += [("validation data (data.val_path)", p) for p in data_paths(recipe.data.val_path)]
    out = Path(recipe.output_dir)
    ownership.check_output(out / SUMMARY_FILE, "sweep", force=True, inputs=inputs, flag="output_dir")
    if plot is None:
        return ownership.check_output(out / PLOT_FILE, "sweep", force=True, inputs=inputs, flag="output_dir")
    return ownership.check_output(Path(plot), "sweep", force=force, inputs=inputs, flag="--plot")


def run_sweep(recipe: Recipe, ranks: list[int], *, threshold: float = 0.02, plot: Path | None = None,
              force: bool = False, recipe_path: str | Path | None = None, console: Console | None = None) -> SweepResult:
    console = console or Console()
    if not method_of(recipe).has_rank:
        raise LoraError(f"lora.method {recipe.lora.method} has no rank to sweep", f"sweep a {' or '.join(RANKED)} recipe")
    if not 0 < threshold < 1:
        raise LoraError(f"--threshold {threshold}: must be between 0 and 1", "e.g. 0.02 for 2% per doubling")

    prepare_recipe(recipe)  # e.g. a classifier's labels from the data: recorded runs compare equal on rerun
    plot = check_sweep_outputs(recipe, plot, force, recipe_path)  # before hours of training
    plans = [rank_recipe(recipe, r) for r in ranks]
    runs: list[RankRun] = []
    for plan in plans:  # check every earlier run before training anything
        done = finished_run(plan)
        if done:
            runs.append(done)
    done_ranks = {r.rank for r in runs}
    for plan in plans:
        r = plan.lora.r
        if r in done_ranks:
            console.print(f"[bold]rank {r}[/]  finished earlier in {plan.output_dir}: skipped")
            continue
        console.rule(f"rank {r}, alpha {plan.lora.alpha:g} -> {plan.output_dir}",
                     characters="-" if plain() else "─")  # piped / NO_COLOR: no box drawing
        try:
            runs.append(train_rank(plan, console))
        except BaseException:  # Ctrl-C, a signal the trainer turned into an error, a failed run
            kept = ", ".join(str(x.rank) for x in sorted(runs, key=lambda x: x.rank)) or "none"
            console.print(f"sweep stopped at rank {r}; finished ranks kept: {kept}. "
                          "Run the same command again to continue.")
            raise
    runs.sort(key=lambda x: x.rank)
    result = SweepResult(runs, find_knee(runs, threshold), threshold)
    out = Path(recipe.output_dir)
    ownership.write_output_text(out / SUMMARY_FILE, json.dumps(
        {"threshold": threshold, "knee": result.knee, "runs": [dataclasses.asdict(x) for x in runs]}, indent=2),
        "sweep", "output_dir")
    result.plot = plot_sweep(result, plot)
    return result


def print_sweep(result: SweepResult, console: Console) -> None:
    from rich.table import Table

    kinds = {r.loss_kind for r in result.runs}
    loss_name = "eval loss" if kinds == {"eval"} else "train loss" if kinds == {"train"} else "loss (eval/train)"

    table = Table(title=f"rank sweep ({loss_name}; knee threshold {100 * result.threshold:g}% per doubling)",
                  title_justify="left", box=table_box())
    for col in ("rank", "alpha", "trainable", loss_name, "gain/doubling"):
        table.add_column(col, justify="right")
    table.add_column("note")  # knee, reused
    gains = result.gains()
    for run in result.runs:
        gain = gains.get(run.rank)
        note = " ".join(n for n, on in (("knee", run.rank == result.knee), ("reused", run.reused)) if on)
        table.add_row(str(run.rank), f"{run.alpha:g}", f"{run.trainable:,d}",
                      "-" if run.loss is None else f"{run.loss:.4f}",
                      "" if gain is None else f"{100 * gain:+.1f}% -> r{_next_rank(result, run.rank)}", note)
    console.print(table)
    if result.knee is not None:
        console.print(f"[bold]knee[/]  r={result.knee}: doubling beyond it improves the {loss_name} by less than "
                      f"{100 * result.threshold:g}%. Confirm the best one or two ranks with a full-length run.")
    elif len(result.runs) > 1:
        console.print(f"[bold]knee[/]  none: the largest rank still gains {100 * result.threshold:g}% or more "
                      "per doubling; sweep higher ranks (or train longer).")
    if "train" in kinds:
        console.print("[dim]no validation data: ranks compared on training loss, which favours larger ranks; "
                      "set data.val_path or data.val_fraction for an honest comparison.[/]")
    if result.plot:
        console.print(f"[bold]plot[/]  {result.plot}")


def _next_rank(result: SweepResult, rank: int) -> int:
    ranks = [r.rank for r in result.runs]
    return ranks[ranks.index(rank) + 1]


def plot_sweep(result: SweepResult, out: Path) -> Path | None:
    """Loss and trainable parameters against rank (log2 axis), the knee marked. None when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = [r for r in result.runs if r.loss is not None]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ranks = [r.rank for r in runs]
    ax.plot(ranks, [r.loss for r in runs], marker="o", color="tab:blue", label=f"final {runs[0].loss_kind} loss")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("loss", color="tab:blue")
    params = ax.twinx()
    params.plot(ranks, [r.trainable for r in runs], marker="s", linestyle="--", color="tab:gray",
                label="trainable parameters")
    params.set_yscale("log")  # it doubles with each doubling of r
    params.set_ylabel("trainable parameters", color="tab:gray")
    if result.knee is not None:
        ax.axvline(result.knee, color="tab:red", linestyle=":")
        ax.annotate(f"knee r={result.knee}", xy=(result.knee, max(r.loss for r in runs)), color="tab:red",
                    xytext=(-4, 0), textcoords="offset points", va="top", ha="right")
    ax.set_title("rank sweep")
    fig.tight_layout()
    try:
        with ownership.writing_file(Path(out), "sweep", "--plot") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out
