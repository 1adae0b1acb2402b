"""`lora eval --tasks`: lm-evaluation-harness benchmarks on the base and on each adapter, through
lm-eval's own HF model with the peft adapter (`model_args: pretrained=BASE, peft=ADAPTER`), so
the numbers are lm-eval's. Task names pass through; --include-path adds a folder of local task
YAML files (what works offline, and what the tests use). lm-eval is the optional `eval` extra:
this module is imported only when --tasks is given.

A task whose dataset is not on this machine (offline, not cached) is refused naming the dataset
instead of lm-eval's traceback."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Callable

from lora_cli.errors import LoraError
from lora_cli import libraries
from lora_cli.libraries import install_hint
from lora_cli.files import ownership
from lora_cli.model.load import local_device
from lora_cli.model.adapter_folder import read_adapter
from lora_cli.ui.terminal import table_box

TASKS_FILE = "eval.json"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LoraError("--tasks needs lm-evaluation-harness", install_hint("eval")) from None
    return lm_eval, TaskManager


def task_manager(include_path: Path | None, tasks: list[str] = ()):
    """lm-eval's task index. When every task asked for is a task of --include-path's own YAML
    files, the index of that folder alone: indexing lm-eval's ~15,000 built-in tasks takes about
    9 s, and a local task needs none of them."""
    _, TaskManager = _lm_eval()
    if include_path is None:
        return TaskManager()
    if not Path(include_path).is_dir():
        raise LoraError(f"--include-path {include_path}: no such folder", "give the folder holding your task YAML files")
    local = TaskManager(include_path=str(include_path), include_defaults=False)
    # tasks only: a group or tag of the folder may name built-in tasks, which only the full index has
    if tasks and all(getattr(getattr(local.task_index.get(t), "kind", None), "name", "") in ("TASK", "PY_TASK")
                     for t in tasks):
        return local
    return TaskManager(include_path=str(include_path))


def check_tasks(manager, tasks: list[str]) -> None:
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        import difflib

        near = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        said = "; ".join(f"{t}" + (f" (did you mean {', '.join(n)}?)" if n else "") for t, n in near.items())
        raise LoraError(f"--tasks: unknown lm-eval task {said}",
                        "`lm_eval ls tasks` lists them; a local task YAML goes in a folder passed with --include-path")


def dataset_of(manager, task: str) -> str:
    """The dataset a task reads (dataset_path, dataset_name), from lm-eval's index of its YAML."""
    entry = manager.task_index.get(task)
    config = dict(getattr(entry, "cfg", None) or {})
    if not config.get("dataset_path"):
        return f"the dataset of task {task}"  # a group, or a task defined in Python
    name = config.get("dataset_name")
    return str(config["dataset_path"]) + (f" ({name})" if name else "")


def evaluate_model(manager, tasks: list[str], model_args: dict, limit: int | None, batch_size: int, seed: int) -> dict:
    lm_eval, _ = _lm_eval()
    # lm-eval's request loops draw tqdm bars it asks for explicitly (TQDM_DISABLE does not reach
    # them); without --verbose what it writes to stderr while it evaluates is kept off the terminal
    hush = contextlib.nullcontext() if libraries.verbose() else contextlib.redirect_stderr(io.StringIO())
    try:
        with hush:
            out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, task_manager=manager,
                                          limit=limit, batch_size=batch_size, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                          log_samples=False)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as e:
        from datasets.exceptions import DatasetNotFoundError

        if isinstance(e, (DatasetNotFoundError, ConnectionError, FileNotFoundError)) or "offline" in str(e).lower():
            missing = ", ".join(dataset_of(manager, t) for t in tasks)
            raise LoraError(f"--tasks {','.join(tasks)}: the dataset is not on this machine ({missing}); {e}",
                            "download it once with network access (it is cached), or use a local task YAML "
                            "(dataset_path: json, data_files) with --include-path") from None
        raise
    return out["results"]


def run_tasks(request, tasks: list[str], include_path: Path | None, out: Path | None, force: bool,
              log: Callable[[str], None] = print) -> dict:
    """{"candidates": [{"name", "kind", "tasks": lm-eval's results}], "settings": ...} for the
    base (with --base, or when no adapter is given) and each adapter; written to OUT/eval.json."""

    if request.merged or request.gguf or request.endpoint:
        raise LoraError("--tasks runs lm-eval on the base and adapters only",
                        "drop --merged / --gguf / --endpoint, or run them without --tasks")
    if out is not None:
        ownership.check_output(Path(out), "eval", force=force, folder=True, inputs=request.inputs())
    manager = task_manager(include_path, tasks)
    check_tasks(manager, tasks)
    infos = {name: read_adapter(p) for name, p in request.adapters.items()}
    base = request.base_model or next((i.base for i in infos.values()), None)
    if base is None:
        raise LoraError("--tasks: nothing to evaluate", "pass --adapter DIR, or --base-model MODEL")
    common = {"pretrained": base, "device": local_device(), "dtype": "float32"}
    runs = ([("base", "base", common)] if request.base or not infos else [])
    runs += [(name, "adapter", {**common, "peft": str(info.path)}) for name, info in infos.items()]
    record = {"version": 1, "candidates": [], "settings": {"tasks": tasks, "limit": request.limit,
                                                           "include_path": str(include_path) if include_path else None}}
    for name, kind, args in runs:
        log(f"lm-eval {','.join(tasks)} on {name}")
        results = evaluate_model(manager, tasks, args, request.limit, request.settings.batch_size,
                                 request.settings.seed or 0)
        record["candidates"].append({"name": name, "kind": kind, "model_args": args, "tasks": results})
    if out is not None:
        with ownership.writing_folder(Path(out), "eval", force) as staging:
            (staging / TASKS_FILE).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    return record


def print_tasks(record: dict, console) -> None:
    from rich.table import Table

    table = Table(title="lm-evaluation-harness", box=table_box())  # piped / NO_COLOR: no box drawing
    for column in ("candidate", "task", "metric", "value", "stderr"):
        table.add_column(column)
    for c in record["candidates"]:
        for task, results in c["tasks"].items():
            for metric, value in results.items():
                if metric == "alias" or "_stderr" in metric or not isinstance(value, (int, float)):
                    continue
                name, _, flt = metric.partition(",")
                stderr = results.get(f"{name}_stderr,{flt}")
                table.add_row(c["name"], task, metric, f"{value:.4g}",
                              f"{stderr:.4g}" if isinstance(stderr, (int, float)) else "")
    console.print(table)
