"""Shared fixtures: tiny models built here, recipes written here, the CLI driven in-process.

Nothing reaches a model hub: every model and tokenizer comes from `lora_cli.tiny.decoder`, the same
builder `make tiny` uses, and is loaded afterwards through the product's own loading code."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # pytest-xdist's workers (make test: -n 2) share the cores: each torch with a thread per core
    # would oversubscribe them. Set before torch is first imported; subprocesses inherit it.
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data" / "demo.jsonl"


def demo_rows(n: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in DEMO_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:n] if n else rows


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's --dist loadgroup (make test) a test file is one group, run by one
    worker, so its module-scoped fixtures (trained adapters) are built once; files that share an
    expensive session fixture mark themselves with one xdist_group (readme_walk's files).
    tryfirst: xdist's worker reads the marks in its own modifyitems hook to name each test's
    group; run after it, these marks were never seen and every test was its own group (a file's
    fixtures were built on both workers: the bench quick runs twice, 150 s of both cores)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    # Longest groups first (make test passes --no-loadscope-reorder, so xdist hands groups out in
    # this order): a long group started last keeps one worker busy while the other idles.
    first = {name: rank for rank, name in enumerate(LONGEST_GROUPS)}
    items.sort(key=lambda item: first.get(_group(item), len(first)))


# The groups that take longest under `make test` (per group: the sum of pytest --durations=0,
# and a timeline of each test's start and end on each worker, cold model cache, idle 2-core
# machine), roughly longest first. xdist starts worker 1 on the 1st group and worker 2 on the 2nd
# and 3rd; the 1st builds the pre-trained tiny Llama (48 s of one core) that most groups
# wait for, so the 2nd to 4th use only tiny_random and keep worker 2 busy meanwhile (with export
# third, worker 2 sat ~20 s waiting for the build). Only the order of the run depends on this
# list: a stale entry costs wall time, never a result.
LONGEST_GROUPS = ["tests/bench/test_bench.py", "tests/train/test_scale_out.py", "tests/train/test_ddp.py",
                  "tests/train/test_preference_ddp.py", "tests/export/test_export.py",
                  "tests/adversarial/test_adversarial_kill.py", "tests/eval/test_eval_harness.py",
                  "tests/train/test_preference.py", "tests/eval/test_eval.py", "tests/tasks/test_tasks.py",
                  "readme_walk"]


def _group(item) -> str:
    return item.get_closest_marker("xdist_group").args[0]


@pytest.fixture(scope="session", autouse=True)
def _data_cache_in_tmp(tmp_path_factory):
    """Tokenised-data caches go to a temporary folder, never to ~/.cache/lora."""
    os.environ["LORA_CACHE_DIR"] = str(tmp_path_factory.mktemp("lora-cache"))


# `lora build-tiny`'s own defaults (cli.build_tiny): the README's demo base. The suite's pre-trained
# base is that same build, so a session pre-trains one Llama, not two (48 s of one core each).
BUILD_TINY_DEFAULTS = {"steps": 300, "seed": 0}


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A pre-trained tiny Llama (knows the bundled facts as plain text, not the chat format): the
    base `lora build-tiny` makes with its defaults, built once per run (_cached_build)."""
    return _tiny_model(tmp_path_factory.mktemp("models") / "tiny-pretrained", **BUILD_TINY_DEFAULTS)


@pytest.fixture(scope="session")
def tiny_random(tmp_path_factory) -> Path:
    """A random tiny Llama with the same tokenizer: for tests that need shapes, not skill."""
    return _tiny_model(tmp_path_factory.mktemp("models") / "tiny-random", hidden=64, steps=0)


def _tiny_model(out: Path, **kwargs) -> Path:
    """Build a tiny Llama into `out`, once per run, or once ever with LORA_TEST_MODEL_CACHE
    (_cached_build); the copy is still loaded through the product's code."""
    from lora_cli.tiny import decoder as tiny
    from lora_cli.tiny.decoder import build_tiny_model

    def build(folder: Path) -> Path:
        return build_tiny_model(folder, DEMO_DATA, log=lambda *_: None, **kwargs)

    source = Path(tiny.__file__).read_bytes() + DEMO_DATA.read_bytes() + repr(sorted(kwargs.items())).encode()
    return _cached_build(out, source, build)


CLASSIFY_DATA = REPO / "data" / "classify_demo.jsonl"
SEQ2SEQ_DATA = REPO / "data" / "seq2seq_demo.jsonl"


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A random tiny BERT (encoder) and its tokenizer, trained on the bundled classification texts."""
    return _tiny_kind(tmp_path_factory.mktemp("models") / "tiny-bert", "bert", CLASSIFY_DATA)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    """A tiny T5 pre-trained (copying and completing the bundled seq2seq documents)."""
    return _tiny_kind(tmp_path_factory.mktemp("models") / "tiny-t5", "t5", SEQ2SEQ_DATA)


@pytest.fixture(scope="session")
def tiny_bart(tmp_path_factory) -> Path:
    """A random tiny BART: for tests that need the shape, not skill."""
    return _tiny_kind(tmp_path_factory.mktemp("models") / "tiny-bart", "bart", SEQ2SEQ_DATA, steps=0)


def _tiny_kind(out: Path, arch: str, data: Path, **kwargs) -> Path:
    """build-tiny --arch ARCH into `out`, reused across sessions like _tiny_model."""
    from lora_cli.tiny import decoder as tiny, encoders as tiny_encoders
    from lora_cli.tiny.encoders import build_tiny_encoder_model

    def build(folder: Path) -> Path:
        return build_tiny_encoder_model(folder, data, arch, log=lambda *_: None, **kwargs)

    source = Path(tiny.__file__).read_bytes() + Path(tiny_encoders.__file__).read_bytes() + data.read_bytes()
    return _cached_build(out, source + repr((arch, sorted(kwargs.items()))).encode(), build)


@pytest.fixture(scope="session", autouse=True)
def _model_cache_of_this_run(tmp_path_factory):
    """Without LORA_TEST_MODEL_CACHE, tiny models are still built once per run: into a folder of
    this run that pytest-xdist's workers share (their base temp folders sit side by side in it)."""
    global _RUN_MODEL_CACHE
    base = tmp_path_factory.getbasetemp()
    _RUN_MODEL_CACHE = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny-models"
    _RUN_MODEL_CACHE.mkdir(exist_ok=True)


_RUN_MODEL_CACHE: Path | None = None


def _cached_build(out: Path, key_source: bytes, build) -> Path:
    """A copy in `out` of build(folder), built once under the hash of key_source (the builder's
    source, its data and arguments) in LORA_TEST_MODEL_CACHE (a developer's opt-in: kept across
    sessions) or else in this run's own cache. A file lock makes a second worker wanting the same
    model wait for the first one's build instead of repeating it."""
    import hashlib
    import shutil

    from filelock import FileLock

    cache = Path(os.environ.get("LORA_TEST_MODEL_CACHE") or _RUN_MODEL_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    built = cache / hashlib.sha256(key_source).hexdigest()[:16]
    with FileLock(str(cache / f".{built.name}.lock")):
        if not (built / "TINY_MODEL.json").exists():
            staging = cache / f".{built.name}.{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            build(staging)
            staging.rename(built)
    shutil.copytree(built, out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def tokenize_alpaca(rows: list[dict], tokenizer, template, max_length: int, train_on: str = "assistant"):
    """Alpaca rows through the path training takes them: checked and parsed into conversations
    (formats.parse_rows), then tokenised and masked (data.tokenize_conversations)."""
    from lora_cli.data.examples import tokenize_conversations
    from lora_cli.data.formats import Source, parse_rows

    conversations = parse_rows(Source("rows", lambda: ((f"row {i}", r) for i, r in enumerate(rows, 1))), "alpaca", {})
    return tokenize_conversations(conversations, tokenizer, template, max_length, train_on)


def llama_config_folder(folder: Path, *, hidden: int, intermediate: int, heads: int, layers: int,
                        vocab: int = 32000) -> Path:
    """A model folder holding a Llama-shaped config.json alone (nothing to load): what
    `lora estimate` reads for the real-sized shapes of the papers."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_attention_heads": heads, "num_hidden_layers": layers,
        "num_key_value_heads": heads, "vocab_size": vocab, "tie_word_embeddings": False}))
    return folder


def make_recipe(tmp_path: Path, model: Path, data: Path | None = None, **sections) -> Path:
    """Write a small recipe into tmp_path; `sections` update the defaults section by section,
    e.g. make_recipe(tmp_path, base, train={"max_steps": 2})."""
    if data is None:
        data = write_jsonl(tmp_path / "data.jsonl", demo_rows(16))
    recipe = {
        "model": {"name_or_path": str(model)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": str(data), "max_length": 128},
        "train": {"epochs": 1, "max_steps": 2, "learning_rate": 1e-3, "batch_size": 2,
                  "gradient_accumulation": 1, "warmup_steps": 0, "logging_steps": 1, "seed": 0},
        "output_dir": str(tmp_path / "run"),
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(name), dict):
            recipe[name].update(value)
        else:
            recipe[name] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def task_recipe(tmp_path, base, model: dict, **sections) -> Path:
    """make_recipe with more keys in the model section and a whole data section (make_recipe's
    own `model` and `data` arguments are paths)."""
    data = sections.pop("data", {})
    path = make_recipe(tmp_path, base, **sections)
    raw = yaml.safe_load(path.read_text())
    raw["model"].update(model)
    raw["data"] = {"max_length": 128, **data}
    if isinstance(sections.get("lora"), dict):  # replace make_recipe's q_proj/v_proj defaults
        raw["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, **sections["lora"]}
    path.write_text(yaml.safe_dump(raw))
    return path


def classify_recipe(tmp_path, base, model: dict | None = None, **sections):
    sections.setdefault("lora", {"target_modules": "attention-qv"})
    sections.setdefault("data", {"path": str(CLASSIFY_DATA), "val_fraction": 0.25, "max_length": 64})
    return task_recipe(tmp_path, base, {"task": "classification", **(model or {})}, **sections)


def seq2seq_recipe(tmp_path, base, **sections):
    sections.setdefault("lora", {"target_modules": "attention-qv"})
    sections.setdefault("data", {"path": str(SEQ2SEQ_DATA), "max_length": 64})
    return task_recipe(tmp_path, base, {"task": "seq2seq"}, **sections)


def train_learned_adapter(base: Path, work: Path, rows: list[dict]) -> Path:
    """`lora train` on `rows` until their answers are learned (all-linear r=8, 40 epochs, the
    human_assistant template): an adapter whose answers are learned, not the near ties of random
    weights, as a user's adapter is. Returns its run folder."""
    from lora_cli.cli import run

    data = write_jsonl(work / "data.jsonl", rows)
    recipe = make_recipe(work, base, data, lora={"r": 8, "alpha": 16, "target_modules": "all-linear"},
                         train={"epochs": 40, "max_steps": -1, "learning_rate": 3e-3, "batch_size": len(rows)})
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    raw["data"]["template"] = "human_assistant"
    recipe.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    assert run(["train", str(recipe)]) == 0
    return work / "run"


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self):
        return f"CliResult(code={self.code}, out={self.out[-2000:]!r}, err={self.err[-2000:]!r})"


@pytest.fixture
def cli(capsys):
    """cli('train', str(recipe)) runs the real command in-process: (code, stdout, stderr)."""
    from lora_cli.cli import run

    def invoke(*args) -> CliResult:
        capsys.readouterr()
        code = run([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


@pytest.fixture
def windows_rules():
    """Windows' file rules emulated in this process for the test (tests/windows_rules.py: an
    emulation of documented rules, not Windows)."""
    _skip_unless_linux()
    from windows_rules import WindowsRules

    with WindowsRules() as rules:
        yield rules


@pytest.fixture(params=["posix", "windows-rules"])
def file_rules(request):
    """Run a writer's test twice: as the OS here behaves, and under the emulated Windows rules
    (the emulator, or None)."""
    if request.param == "posix":
        yield None
        return
    _skip_unless_linux()
    from windows_rules import WindowsRules

    with WindowsRules() as rules:
        yield rules


def _skip_unless_linux() -> None:
    if not sys.platform.startswith("linux"):  # on Windows itself the real rules apply anyway
        pytest.skip("the Windows-rules emulation reads /proc and locks with fcntl: Linux only")


@pytest.fixture(scope="session")
def readme_walk(tmp_path_factory):
    """The README's marked blocks run in order in a fresh folder (tests/readme_walk.py); later
    tests reuse its trained demo run (`walk.root / "runs" / "demo"`)."""
    from readme_walk import walk_readme

    return walk_readme(REPO, tmp_path_factory.mktemp("readme"))
