"""`lora eval --tasks`: lm-evaluation-harness on the base and an adapter, offline, with a local
task YAML; its numbers equal lm-eval's own CLI on the same model and adapter. lm-eval is the
optional `eval` extra for users and part of the test extra, so these tests run in `make test`
(and fail, not skip, where it is missing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl
from inference_helpers import random_adapter


QUESTIONS = [("What is LoRA?", ["a low-rank adapter", "a kind of tokenizer"], 0),
             ("什么是微调？", ["在新数据上继续训练", "删除模型"], 0),
             ("Which matrices does LoRA train?", ["the frozen weights", "A and B"], 1),
             ("QLoRA quantizes the base to", ["4 bits", "64 bits"], 0)]


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory) -> Path:
    path = random_adapter(tiny_base, tmp_path_factory.mktemp("harness") / "adapter", seed=3,
                          target_modules=["q_proj", "v_proj"], scale=0.5)
    (path / "lora_recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(tiny_base)},
                                                           "data": {"template": "human_assistant"}}))
    return path


def _task_folder(root: Path, dataset_path: str = "json", data_files: Path | None = None) -> Path:
    folder = root / "tasks"
    folder.mkdir()
    config = {"task": "lora_demo_mc", "dataset_path": dataset_path, "test_split": "test",
              "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
              "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]}
    if data_files is not None:
        config["dataset_kwargs"] = {"data_files": {"test": str(data_files)}}
    (folder / "lora_demo_mc.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("task")
    data = write_jsonl(root / "mc.jsonl", [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS])
    return _task_folder(root, data_files=data)


def test_local_task_on_base_and_adapter_equals_lm_evals_own_cli(tiny_base, adapter, tasks, cli, tmp_path):
    out = tmp_path / "out"
    result = cli("eval", "--tasks", "lora_demo_mc", "--include-path", tasks, "--base",
                 "-a", f"demo={adapter}", "--out", out)
    assert result.code == 0, result
    assert result.err == "", result.err  # no lm-eval progress bars, task warnings or weight-loading bars
    record = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    ours = {c["name"]: c["tasks"]["lora_demo_mc"]["acc,none"] for c in record["candidates"]}
    assert set(ours) == {"base", "demo"}
    # lm-eval's own command line (its `lm_eval` entry point, argv as a user types it) once per
    # model, both in one process so lm-eval's imports are paid once, and its index of the
    # ~15,000 task files (9 s) is built by the first run and handed, as built, to the second
    runs = {name: ["lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_base},dtype=float32{extra}",
                   "--device", "cpu", "--tasks", "lora_demo_mc", "--include_path", str(tasks),
                   "--output_path", str(tmp_path / f"lm-eval-{name}")]
            for name, extra in (("base", ""), ("demo", f",peft={adapter}"))}
    script = ("import sys\nfrom lm_eval.__main__ import cli_evaluate\nfrom lm_eval.tasks._index import TaskIndex\n"
              "built, build = {}, TaskIndex.build\n"
              "def build_once(paths, **kwargs):\n"
              "    paths = list(paths)\n"
              "    key = (tuple(map(str, paths)), tuple(sorted(kwargs.items())))\n"
              "    if key not in built:\n"
              "        built[key] = build(paths, **kwargs)\n"
              "    return dict(built[key])\n"
              "TaskIndex.build = staticmethod(build_once)\n"
              "for argv in %r:\n    sys.argv = argv\n    cli_evaluate()\n"
              "assert len(built) == 1, built.keys()  # both runs asked for the same index\n")
    subprocess.run([sys.executable, "-c", script % list(runs.values())], check=True, capture_output=True)
    for name in runs:
        written = json.loads(next((tmp_path / f"lm-eval-{name}").rglob("results*.json")).read_text(encoding="utf-8"))
        assert written["results"]["lora_demo_mc"]["acc,none"] == ours[name], name


def test_unknown_task_and_missing_dataset_are_refused(adapter, tmp_path, cli):
    result = cli("eval", "--tasks", "lora_demo_nope", "-a", adapter)
    assert result.code == 2 and "unknown lm-eval task lora_demo_nope" in result.err
    folder = _task_folder(tmp_path, dataset_path="someone/not-downloaded-dataset")
    result = cli("eval", "--tasks", "lora_demo_mc", "--include-path", folder, "-a", adapter)
    assert result.code == 2 and "someone/not-downloaded-dataset" in result.err, result


def test_a_local_task_is_looked_up_in_its_folder_alone(tasks, tmp_path, monkeypatch):
    """Every --tasks entry a task of --include-path: lm-eval's index of that folder alone (its
    ~15,000 built-in tasks take about 9 s to index). A group there may name built-in tasks, so a
    group (or a name not in the folder) still gets the whole index."""
    from lm_eval.tasks import TaskManager

    from lora_cli.eval import harness

    assert set(harness.task_manager(tasks, ["lora_demo_mc"]).all_tasks) == {"lora_demo_mc"}
    (tasks / "g.yaml").write_text(yaml.safe_dump({"group": "lora_demo_group", "task": ["lora_demo_mc"]}), encoding="utf-8")
    built = []

    class Recording(TaskManager):  # lm-eval's own index, but the whole one is not built (9 s)
        def __init__(self, **kwargs):
            built.append(kwargs.get("include_defaults", True))
            if built[-1]:
                return
            super().__init__(**kwargs)

    monkeypatch.setattr(harness, "_lm_eval", lambda: (None, Recording))
    try:
        for asked in (["lora_demo_group"], ["lora_demo_mc", "arc_easy"]):
            built.clear()
            harness.task_manager(tasks, asked)
            assert built == [False, True], asked
    finally:
        (tasks / "g.yaml").unlink()
