"""Full, read-only and forbidden disks (issue 26, class 4): every writer (merge, save, export,
generate --out, predict --out, analyze and sweep plots, train) turns ENOSPC, EROFS and
permission errors into exit 2 naming the path, whatever library raised them (safetensors and
gguf raise their own types), and leaves nothing behind.

The table injects each fault into the library call that writes the bytes, as that library
reports it: safetensors raises its SafetensorError with the OS error rendered inside, gguf,
matplotlib and plain Python raise OSError. `test_real_*` do it for real on a small tmpfs (where
the test may mount one). docs/reliability.md lists the writers."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import types
from pathlib import Path

import pytest
from conftest import REPO, make_recipe, write_jsonl
from inference_helpers import random_adapter
from safety_helpers import assert_clean_refusal, assert_tree_unchanged, snapshot_tree

FAULTS = {"ENOSPC": errno.ENOSPC, "EROFS": errno.EROFS, "EACCES": errno.EACCES}


def _os_error(code: int, path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def _safetensors_error(code: int):
    from safetensors import SafetensorError

    # how safetensors' Rust writer reports it: its own type, the io::Error rendered inside
    return SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")


def _partial_then(fail):
    """A writer that leaves part of a file, then fails: what a full disk does."""
    def write(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"\0" * 4096)
        raise fail
    return write


# --------------------------------------------------------------------------- the writers

def _merge(u, m, code):
    from transformers import PreTrainedModel

    fail = _partial_then(_safetensors_error(code))
    m.setattr(PreTrainedModel, "save_pretrained", lambda self, folder, **kw: fail(Path(folder) / "model.safetensors"))
    return ["merge", "--adapter", u["adapter"], "--out", u["root"] / "merged"], u["root"] / "merged"


def _save(u, m, code):
    import lora_cli.export.merge

    m.setattr(lora_cli.export.merge.shutil, "copy2", lambda src, dst, **kw: _partial_then(_os_error(code, dst))(dst))
    return ["save", u["adapter"], "--out", u["root"] / "exported"], u["root"] / "exported"


def _export(fmt: str):
    def setup(u, m, code):
        import gguf

        def fail(self, *args, **kwargs):
            raise _os_error(code, self.path if hasattr(self, "path") else "model.gguf")

        m.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
        out = u["root"] / ("ollama" if fmt == "ollama" else "model.gguf")
        return ["export", "--adapter", u["adapter"], "--format", fmt, "--out", out], out
    return setup


def _failing_staged_text(m, out_name: str, code: int):
    """Path.write_text fails (after a partial write) for the staged copy of `out_name` only."""
    original = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name.startswith(".lora-staged-" + out_name):
            _partial_then(_os_error(code, self))(self)
        return original(self, data, *args, **kwargs)

    m.setattr(Path, "write_text", write_text)


def _generate(u, m, code):
    out = u["root"] / "answers.jsonl"
    _failing_staged_text(m, out.name, code)
    prompts = write_jsonl(u["root"] / "prompts.jsonl", [{"instruction": "hi"}])
    return ["generate", "--adapter", u["adapter"], "--file", prompts, "--out", out, "--max-new-tokens", "2"], out


def _predict(u, m, code):
    """The model part stands in (a classifier is trained elsewhere): only the write is under test."""
    import lora_cli.model.adapter_folder
    import lora_cli.model.load
    import lora_cli.tasks.classification

    info = types.SimpleNamespace(model_section={"labels": ["neg", "pos"]}, recipe={"data": {"max_length": 16}})
    m.setattr(lora_cli.model.adapter_folder, "refuse_unless", lambda *a, **k: None)
    m.setattr(lora_cli.model.load, "load_for_inference", lambda adapters, base=None, **_: (None, None, {"adapter": info}))
    m.setattr(lora_cli.tasks.classification, "predict_file", lambda *a: ([{"text": "a row", "label": "pos"}], None))
    out = u["root"] / "labels.jsonl"
    _failing_staged_text(m, out.name, code)
    rows = write_jsonl(u["root"] / "rows.jsonl", [{"text": "a row"}])
    return ["predict", "--adapter", u["adapter"], "--file", rows, "--out", out], out


def _failing_savefig(m, code):
    from matplotlib.figure import Figure

    def savefig(self, fname, *args, **kwargs):
        _partial_then(_os_error(code, fname))(fname)

    m.setattr(Figure, "savefig", savefig)


def _analyze(u, m, code):
    _failing_savefig(m, code)
    out = u["root"] / "plots" / "ranks.png"
    return ["analyze", u["adapter"], "--no-base", "--plot", out], out


def _sweep(u, m, code):
    """Training stands in (sweep's own seam): only the summary and plot writes are under test."""
    import lora_cli.train.sweep as sweep

    def fake_train(plan, console):
        return sweep.RankRun(plan.lora.r, plan.lora.alpha, plan.output_dir, 10 * plan.lora.r, 1000, 2.0 / plan.lora.r,
                             "train", 1)

    m.setattr(sweep, "train_rank", fake_train)
    _failing_savefig(m, code)
    out = u["root"] / "sweep.png"
    recipe = make_recipe(u["root"], u["base"], output_dir=str(u["root"] / "sweep"))
    return ["sweep", recipe, "--ranks", "2,4", "--plot", out], out


def _train(u, m, code):
    """The final adapter's safetensors write fails."""
    from peft import PeftModel

    fail = _partial_then(_safetensors_error(code))
    m.setattr(PeftModel, "save_pretrained",
              lambda self, folder, **kw: fail(Path(folder) / "adapter_model.safetensors"))
    recipe = make_recipe(u["root"], u["base"], train={"max_steps": 1, "save_steps": 0}, output_dir=str(u["root"] / "run"))
    return ["train", recipe], u["root"] / "run"


WRITERS = {"merge": _merge, "save": _save, "export-gguf": _export("gguf"), "export-gguf-adapter": _export("gguf-adapter"),
           "export-ollama": _export("ollama"), "generate-out": _generate, "predict-out": _predict,
           "analyze-plot": _analyze, "sweep-plot": _sweep, "train": _train}


@pytest.fixture(scope="module")
def adapter_src(tiny_random, tmp_path_factory) -> Path:
    return random_adapter(tiny_random, tmp_path_factory.mktemp("adapters") / "valid", seed=3)


@pytest.fixture
def user(tmp_path, tiny_random, adapter_src) -> dict:
    root = tmp_path / "user"
    root.mkdir()
    shutil.copytree(adapter_src, root / "adapter")
    return {"root": root, "adapter": root / "adapter", "base": tiny_random}


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".lora-*")
                  if p.name.startswith((".lora-staged-", ".lora-aside-", ".lora-trash-")))


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
@pytest.mark.parametrize("writer", list(WRITERS), ids=list(WRITERS))
def test_disk_fault_is_exit_2_naming_the_path_and_leaves_nothing(writer, fault, user, cli, monkeypatch):
    argv, target = WRITERS[writer](user, monkeypatch, FAULTS[fault])
    before = snapshot_tree(user["root"])
    result = cli(*argv)
    assert_clean_refusal(result, os.strerror(FAULTS[fault]))
    assert str(target) in " ".join(result.err.split()), result
    assert not _leftovers(user["root"]), _leftovers(user["root"])
    if writer != "train":  # a run keeps its folder (recipe, metrics, the checkpoints before the fault)
        changes = [c for c in _changes(before, snapshot_tree(user["root"])) if not c.endswith(".lora-owner.json")]
        assert not changes or writer == "sweep-plot", changes  # sweep's own run folders and summary stay
        assert not target.exists()


def _changes(before, after):
    from safety_helpers import tree_changes

    return [c for c in tree_changes(before, after)]


# --------------------------------------------------------------------------- a real small disk

def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "256k"):
        pytest.skip("cannot mount a tmpfs here (needs root): the simulated faults above still run")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_real_full_disk_during_merge(small_disk, user, cli):
    """A real ENOSPC from safetensors' Rust writer (its SafetensorError, not an OSError)."""
    result = cli("merge", "--adapter", user["adapter"], "--out", small_disk / "merged")
    assert_clean_refusal(result, "No space left on device")
    assert str(small_disk / "merged") in " ".join(result.err.split())
    assert os.listdir(small_disk) == []


def test_real_read_only_disk_is_refused_before_any_work(small_disk, user, cli):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    for argv in (["merge", "--adapter", user["adapter"], "--out", small_disk / "merged"],
                 ["save", user["adapter"], "--out", small_disk / "exported"],
                 ["analyze", user["adapter"], "--no-base", "--plot", small_disk / "a.png"],
                 ["train", make_recipe(user["root"], user["base"], output_dir=str(small_disk / "run"))]):
        result = cli(*argv)
        assert_clean_refusal(result, "Read-only file system")
    assert os.listdir(small_disk) == []


def test_docs_list_every_writer():
    doc = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    missing = [w for w in WRITERS if f"`{w}`" not in doc]
    assert not missing, f"docs/reliability.md does not list: {missing}"
