"""Progress on the long waits of merge, export and eval (lora_cli/ui/progress.py): run as a script
or CI runs them (stdout not a terminal), each prints plain lines naming its stages and counting
its work, ending in a `done` line; on an 80-column terminal the bar and the count stay."""

from __future__ import annotations

import re

from conftest import demo_rows, write_jsonl
from inference_helpers import random_adapter

DONE = re.compile(r"(\d+)/(\d+) (\w+) \(100%\), \d+ s done$")


def _lines(out: str, description: str) -> list[str]:
    lines = [line[len(description) + 2:] for line in out.splitlines() if line.startswith(description + ": ")]
    assert lines and "\x1b[" not in out and "\r" not in out, out
    return lines


def _done(lines: list[str]) -> tuple[int, int]:
    match = DONE.fullmatch(lines[-1])
    assert match, lines
    return int(match.group(1)), int(match.group(2))


def test_merge_names_its_stages(tiny_random, tmp_path, cli):
    adapter = random_adapter(tiny_random, tmp_path / "adapter", seed=1)
    out = tmp_path / "merged"
    res = cli("merge", "--adapter", adapter, "--out", out)
    assert res.code == 0, res
    lines = _lines(res.out, f"merging into {out}")
    stages = [re.sub(r" \(\d+/4 steps, \d+ s so far\)$", "", line) for line in lines[:-1]]
    assert stages == [f"loading the base {tiny_random}", f"loading the adapter {adapter}", "merging",
                      "writing safetensors shards of at most 5GB"], lines
    assert [re.search(r"\((\d+)/4 steps", line).group(1) for line in lines[:-1]] == ["0", "1", "2", "3"]
    assert _done(lines) == (4, 4)
    assert f"merged model (float32) written to {out}\n" in res.out


def test_export_counts_every_tensor_it_converts(tiny_random, tmp_path, cli):
    import gguf

    adapter = random_adapter(tiny_random, tmp_path / "adapter", seed=2)
    out = tmp_path / "model.gguf"
    res = cli("export", "--adapter", adapter, "--format", "gguf", "--out", out)
    assert res.code == 0, res
    lines = _lines(res.out, f"exporting {out}")
    tensors = len(gguf.GGUFReader(str(out)).tensors)
    assert any(line.startswith(f"converting {tensors} tensors to f16 (3/") for line in lines), lines
    assert any(line.startswith("writing the GGUF file") for line in lines), lines
    assert _done(lines) == (3 + tensors + 1,) * 2  # the merge's three stages, each tensor, the file

    lora_out = tmp_path / "adapter.gguf"
    res = cli("export", "--adapter", adapter, "--format", "gguf-adapter", "--out", lora_out)
    assert res.code == 0, res
    lines = _lines(res.out, f"exporting {lora_out}")
    lora_tensors = len(gguf.GGUFReader(str(lora_out)).tensors)
    assert lines[0].startswith(f"converting {lora_tensors} LoRA tensors to f32"), lines
    assert _done(lines) == (lora_tensors + 1,) * 2


def test_eval_counts_rows_of_every_candidate(tiny_random, tmp_path, cli):
    adapter = random_adapter(tiny_random, tmp_path / "tuned", seed=3, template="human_assistant")
    data = write_jsonl(tmp_path / "rows.jsonl", demo_rows(3))
    res = cli("eval", "--data", data, "--base", "-a", adapter, "--metrics", "loss,exact_match",
              "--max-new-tokens", "4", "--bootstrap", "10")
    assert res.code == 0, res
    lines = _lines(res.out, "lora eval")
    assert lines[0].startswith("loading the candidates (0 answers"), lines
    assert [line.split(" (")[0] for line in lines if line.startswith("asking")] == ["asking base", "asking tuned"]
    # 3 rows, each asked for text (exact_match) and scored by loss, by 2 candidates
    assert _done(lines) == (12, 12) and sum(line.startswith("12/12") for line in lines) == 1
    assert not any(0x2500 <= ord(c) < 0x2580 for c in res.out), res.out  # the table too: no box drawing
    quiet = cli("-q", "eval", "--data", data, "--base", "-a", adapter, "--metrics", "loss,exact_match",
                "--max-new-tokens", "4", "--bootstrap", "10")
    table = "".join(line for line in res.out.splitlines(keepends=True) if not line.startswith("lora eval: "))
    assert quiet.code == 0 and "tuned" in table and quiet.out == table, quiet  # --quiet: the table, no progress
    # piped, a table keeps its natural width: no cell cut to "…" at rich's assumed 80 columns
    assert "…" not in table and re.search(r"\n\| tuned +\| adapter +\|", table), table


def test_live_bar_keeps_bar_and_count_at_80_columns_with_a_long_stage():
    import io

    from rich.console import Console

    from lora_cli.ui import progress

    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    bar = progress._Live("merging into /a/rather/long/path/to/runs/demo-merged", 4, "steps", console)
    bar.note("loading the adapter /a/rather/long/path/to/runs/demo")
    bar.advance(2)
    bar.progress.refresh()
    bar.finish()
    final = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue().rsplit("\x1b[2K", 1)[-1])
    lines = [line.rstrip() for line in final.splitlines() if line.strip()]
    assert "━" in lines[0] and "2/4 steps" in lines[0], lines
    assert all(len(line) <= 80 for line in lines), lines
    # the description and the stage fold onto the lines below, whole
    shown = lines[0].split("━")[0][2:] + "".join(line.strip() for line in lines[1:])
    assert shown.replace(" ", "") == ("merging into /a/rather/long/path/to/runs/demo-merged: "
                                      "loading the adapter /a/rather/long/path/to/runs/demo").replace(" ", "")


def test_generate_file_progress_leaves_stdout_to_the_answers(tiny_random, tmp_path, cli):
    adapter = random_adapter(tiny_random, tmp_path / "adapter", seed=4, template="human_assistant")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is LoRA?\nWhat is a rank?\n", encoding="utf-8")
    res = cli("generate", "-a", adapter, "--file", prompts, "--max-new-tokens", "2")
    assert res.code == 0, res
    assert _done(_lines(res.err, "answering")) == (2, 2) and "answering" not in res.out
    assert res.out.count(f"[{adapter.name}] What is") == 2, res.out  # each answer under its prompt
    quiet = cli("-q", "generate", "-a", adapter, "--file", prompts, "--max-new-tokens", "2")
    assert quiet.code == 0 and "answering" not in quiet.err + quiet.out, quiet
    assert quiet.out == res.out  # --quiet drops lora's status lines, not the answers' headers


def test_train_and_estimate_spin_while_libraries_load(tiny_random, tmp_path, cli, monkeypatch):
    """The import of transformers' Trainer is seconds of silence before the first line of `lora
    train`: a spinner covers it on a terminal (progress.spinner; plain output waits for the plan)."""
    from contextlib import contextmanager

    from conftest import make_recipe
    from lora_cli.ui import progress

    spun = []

    @contextmanager
    def spinner(description, console):
        spun.append(description)
        yield

    monkeypatch.setattr(progress, "spinner", spinner)
    recipe = make_recipe(tmp_path, tiny_random)
    assert cli("train", recipe, "--dry-run").code == 0
    assert spun == ["loading the training libraries"]
    assert cli("estimate", recipe).code == 0  # torch is imported to size the model: seconds too
    assert spun[1:] == ["reading the model's config"]
