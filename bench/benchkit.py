"""What every bench/bench_*.py shares, so that each script holds only what it measures.

- Where things are (REPO, the tiny base `make tiny` builds, the demo rows), offline by default.
- The options every script takes: --quick (small sizes, one repeat: proves the script runs end to
  end in seconds; its figures are marked and never written into docs/benchmarks.md) and --model.
- A scratch folder, JSONL in and out, recipes written the way `lora train` reads them.
- The random-weight pieces several benches build: a LoRA adapter whose B is not zero, a larger Llama.
- Timing (one call; variants interleaved round by round, so a busy machine slows them alike),
  peak memory (the kernel's VmHWM, or torch.cuda's peak), the machine and versions a figure was
  taken on, and the marked block of a doc that a table replaces.

Each script keeps its own table layout (the figures in docs/benchmarks.md were pasted from them).

Not a `bench_*.py` name on purpose: `make bench` and tests/bench/test_bench.py run every bench_*.py.
Heavy libraries are imported inside the functions that need them, as in the product.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # lora_cli from this checkout, installed or not
    sys.path.insert(0, str(REPO))

from lora_cli import libraries  # noqa: E402

libraries.configure()  # quiet and offline as every lora command is (no hub-kernel lines from bitsandbytes)
MODEL = REPO / "models" / "tiny-llama"  # what `make tiny` (and so `make bench`) builds
DATA = REPO / "data" / "demo.jsonl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}  # the benches' adapter
PROMPTS = ["用一句话解释什么是LoRA", "What is QLoRA?", "Explain the rank r of a LoRA adapter in one sentence.",
           "写一首关于秋天的短诗", "What does lora_alpha do?", "Why is B initialised to zero?",
           "How do I merge an adapter?", "列出三种参数高效微调方法"]  # what the inference benches ask

QUICK_MARK = "QUICK RUN (--quick): small sizes, one repeat; the figures mean nothing"

T = TypeVar("T")


# --------------------------------------------------------------------------- options

def arguments(description: str, quick: str, *, model: bool = True) -> argparse.ArgumentParser:
    """The parser every script starts from: --quick (what it shrinks to, in `quick`) and, for
    the scripts that read the tiny base, --model."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help=f"{quick}: proves the script runs end to end in seconds; figures marked as quick, "
                             "docs/benchmarks.md never written")
    if model:
        parser.add_argument("--model", type=Path, default=MODEL,
                            help="the tiny base (default models/tiny-llama, which `make tiny` builds)")
    return parser


def quick_note(args, separator: str = "; ") -> str:
    """What a header line ends with in a quick run (nothing otherwise)."""
    return f"{separator}{QUICK_MARK}" if args.quick else ""


def require_model(folder: Path) -> None:
    """Exit 1 with what to do when the tiny base is not there."""
    if not (Path(folder) / "config.json").is_file():
        sys.exit(f"{folder} is missing: run `make tiny` (or `lora build-tiny`) first, or pass --model")


# --------------------------------------------------------------------------- files

@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary folder for one run, removed afterwards (some runs write a gigabyte there)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows) -> Path:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return Path(path)


def bytes_on_disk(path: Path) -> int:
    """A file's size, or the sum of every file under a folder."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def recipe_raw(base, rows, out, /, *, lora: dict = LORA, **sections) -> dict:
    """A recipe as a dict: the base model, the data file, the benches' adapter (unless `lora` is
    given whole) and the output folder; each section named in `sections` (model=, data=,
    train=...) gets those keys added."""
    raw = {"model": {"name_or_path": str(base)}, "lora": dict(lora), "data": {"path": str(rows)},
           "output_dir": str(out)}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def recipe(base, rows, out, /, *, lora: dict = LORA, **sections):
    """recipe_raw, read by the product's schema (what `lora train` would run)."""
    from lora_cli.recipe.schema import recipe_from_dict

    return recipe_from_dict(recipe_raw(base, rows, out, lora=lora, **sections))


# --------------------------------------------------------------------------- random-weight models

def random_adapter(base: Path, out: Path, *, r: int = 16, alpha: int = 32, scale: float = 0.02,
                   seed: int = 0) -> Path:
    """A LoRA adapter on every linear layer of `base` with random, non-zero A and B: the speed of
    a trained adapter (training changes the values, not the work)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(out)
    return Path(out)


def build_larger(out: Path, tokenizer_from: Path = MODEL) -> Path:
    """A random 8-layer, 512-wide Llama (25.7M parameters) with the tiny model's tokenizer (no
    training: speed only), where an adapter's extra work weighs less against the base's."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


# --------------------------------------------------------------------------- timing

def timed(fn: Callable[..., T], *args, **kwargs) -> tuple[T, float]:
    """(fn's result, its wall seconds)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def round_robin(variants: dict[str, Callable[[int], T]], rounds: int, *, alternate: bool = False) -> dict[str, list[T]]:
    """Each variant called once per round (with the round's index), in turn, `rounds` times: other
    work on a shared machine then falls on every variant alike. alternate: every other round
    runs them in reverse order, so none always runs first. Returns each variant's results in
    round order."""
    results: dict[str, list[T]] = {name: [] for name in variants}
    for i in range(rounds):
        order = list(variants)
        if alternate and i % 2:
            order.reverse()
        for name in order:
            results[name].append(variants[name](i))
    return results


# --------------------------------------------------------------------------- memory

def process_status_mb(pid: int | str = "self") -> dict[str, float]:
    """VmHWM (the process's peak resident memory so far), RssAnon (its own memory) and RssFile
    (pages of files it maps, such as memory-mapped Arrow files: the kernel's page cache, dropped
    under pressure) of a process, MB; empty when it is gone or this is not Linux."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmHWM", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) / 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return fields


def peak_rss_bytes() -> int:
    """This process's peak resident memory, bytes: the kernel's VmHWM, not ru_maxrss (a child's
    ru_maxrss starts at its parent's resident size when it forks)."""
    hwm = process_status_mb().get("VmHWM")
    if hwm is not None:
        return int(hwm * 1024 * 1024)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the nearest measure


def peak_memory() -> tuple[int, str]:
    """(bytes, what they are): torch.cuda's peak allocation on a GPU, else the peak resident set."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "cuda allocated"
    return peak_rss_bytes(), "cpu peak RSS"


# --------------------------------------------------------------------------- the machine

def load_average() -> str:
    return f"load average {os.getloadavg()[0]:.1f}"


def cpus_and_load() -> str:
    return f"{os.cpu_count()} CPUs, {load_average()}"


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def torch_threads() -> str:
    import torch

    return f"{torch.get_num_threads()} threads, torch {torch.__version__}"


def versions(names=("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "flash-attn",
                    "accelerate")) -> dict[str, str]:
    """Installed versions of the packages a figure depends on (absent ones left out)."""
    import importlib.metadata

    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


# --------------------------------------------------------------------------- docs

def replace_marked_block(doc: Path, begin: str, end: str, body: str) -> None:
    """Replace what lies between the `begin` and `end` markers of a markdown file with `body`
    (markers and body added at the end when absent), written whole."""
    from lora_cli.files import atomic

    text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    block = f"{begin}\n{body}{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic.write_text(doc, text)
