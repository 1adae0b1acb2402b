"""Every bench/bench_*.py runs end to end with --quick, each in its own process, offline, on a
tiny base built the way conftest builds them (LORA_TEST_MODEL_CACHE reuses it), and prints the
table it exists for: the expected columns, one row per thing measured, and numbers that hold
together (rates above zero, the reference row at 1.00x, one figure derived from others as it
should be). What a figure is worth is not judged: a quick run's figures mean nothing. Nor may a
quick run touch docs/benchmarks.md. bench_gpu.py's quick run is made by bench/gpu_check.sh at toy
size, so the same run proves the GPU check's user path and its table.

Only the scripts whose tests were selected run. gpu_check.sh runs beside the others, which are
forked one after another from a python that has imported torch, transformers and peft
(tests/bench/preloaded.py: most of a fresh quick run was those imports); gpu_check.sh's own
pythons (PY: its lora commands, bench_gpu.py and each variant's process) are such forks too,
served on demand (tests/bench/forkserver.py). A new bench_*.py without a check below fails here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("bench_*.py"))
sys.path.insert(0, str(BENCH))
from benchkit import QUICK_MARK  # noqa: E402
from bench_gpu import DOC_BEGIN as GPU_DOC_BEGIN, DOC_END as GPU_DOC_END  # noqa: E402

TIMEOUT_S = 900  # one script; a loaded shared machine can be ten times slower than an idle one


# --------------------------------------------------------------------------- parsing

def number(cell: str) -> float:
    """The first number in a cell: '1,234', '0.94 MiB', '2.17x', '+19%' -> float."""
    found = re.search(r"[-+]?\d[\d,]*\.?\d*", cell)
    assert found, f"no number in {cell!r}"
    return float(found.group().replace(",", ""))


def ratio_of_rounded(ratio: float, a: float, b: float, half: float = 0.5) -> bool:
    """Whether `ratio` can be a / b when a and b were printed rounded to +-half (and the ratio to 2 places)."""
    return (a - half) / (b + half) - 0.006 <= ratio <= (a + half) / max(b - half, 1e-9) + 0.006


def pipe_table(out: str, first_column: str) -> list[dict[str, str]]:
    """The table whose header starts with `first_column`, as rows of {column: cell}. Reads
    markdown tables and the plain `a | b | c` ones, padded or not; skips the rule line."""
    lines = out.splitlines()
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    start = next(i for i, line in enumerate(lines) if cells(line)[0] == first_column and "|" in line)
    header = cells(lines[start])
    rows = []
    for line in lines[start + 1:]:
        if "|" not in line:
            break
        row = cells(line)
        if all(set(c) <= set("-: ") for c in row):
            continue
        assert len(row) == len(header), (header, line)
        rows.append(dict(zip(header, row)))
    return rows


# --------------------------------------------------------------------------- one check per script

def check_checkpoints(out: str, _work: Path) -> None:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"measure +value", line))
    values = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in lines[start + 1:] if line.strip())
    steps = int(values.pop("optimizer steps"))
    assert steps == 6
    written, every = re.fullmatch(r"(\d+) \(every (\d+)\)", values.pop("checkpoints written (save_steps)")).groups()
    assert int(every) == 2 and 2 <= int(written) <= steps // 2
    assert number(values.pop("atomic save, median wall")) > 0
    assert number(values.pop("train_runtime without saving")) > 0 and number(values.pop("train_runtime with saving")) > 0
    on_disk = number(values.pop("one checkpoint on disk"))
    estimate, ratio = re.fullmatch(r"([\d.]+) MiB \(([\d.]+)x actual\)", values.pop("preflight estimate per checkpoint")).groups()
    assert on_disk > 0 and ratio_of_rounded(float(ratio), float(estimate), on_disk, half=0.005)
    (resume_key, wall), = values.items()
    step, remaining = map(int, re.fullmatch(r"resume from checkpoint-(\d+): load \+ (\d+) steps, wall", resume_key).groups())
    assert step % 2 == 0 and 0 < step < steps and step + remaining == steps and number(wall) > 0


def check_data(out: str, _work: Path) -> None:
    speed = pipe_table(out, "workflow")
    assert [r["workflow"].split(" (")[0] for r in speed] == ["source workflow", "lora train", "lora train, second run"]
    assert all(number(r["preprocessing rows/s"]) > 0 for r in speed)
    for r in speed[:2]:
        assert number(r["training supervised tokens/s"]) > 0
        assert 0 < number(r["final loss"]) < 20 and 0 < number(r["loss on rows as inference asks (BOS)"]) < 20
    assert speed[2]["training supervised tokens/s"] == speed[2]["final loss"] == ""
    # lora's loss on the rows as inference asks is its own final loss (it trains with BOS)
    assert speed[1]["final loss"] == speed[1]["loss on rows as inference asks (BOS)"]
    memory = pipe_table(out, "JSONL size")
    assert [round(number(r["JSONL size"])) for r in memory] == [1]
    for r in memory:
        peak, floor = number(r["peak RSS of `lora data preview`"]), number(r["same command, one-row file"])
        assert number(r["rows"]) > 1000 and peak > 0 and floor > 0 and number(r["rows/s, whole command"]) > 0
        assert number(r["peak / file size"]) == pytest.approx(peak / number(r["JSONL size"]), rel=0.2)


def check_estimate(out: str, _work: Path) -> None:
    rows = pipe_table(out, "model")
    assert [(r["model"], r["quant"]) for r in rows] == [
        ("tiny-llama", "none"), ("tiny-llama", "4bit"), ("Qwen2.5-0.5B", "none"), ("Qwen2.5-0.5B", "4bit")]
    qwen = [r for r in rows if r["model"] == "Qwen2.5-0.5B"]
    for r in qwen:  # r=16 on every linear layer of Qwen2.5-0.5B: 24 x 16 x (7 layer in + out widths)
        assert r["params"] == "0.503B" and number(r["trainable (r16 all-linear)"]) == 24 * 16 * (
            (896 + 896) * 2 + (896 + 128) * 2 + (896 + 4864) * 3)
        assert 0 < number(r["GiB ckpt"]) < number(r["GiB no ckpt"])
    assert number(qwen[1]["GiB no ckpt"]) < number(qwen[0]["GiB no ckpt"])  # 4-bit base weights are smaller
    assert all(number(r["estimate s"]) >= 0 and number(r["trainable (r16 all-linear)"]) > 0 for r in rows)


def check_eval(out: str, _work: Path) -> None:
    rates = dict(re.findall(r"^  (\w+) +([\d.]+) rows/s$", out, flags=re.M))
    assert list(rates) == ["base", "adapter", "merged", "gguf", "endpoint"], out
    assert all(float(v) > 0 for v in rates.values())
    assert out.startswith("4 demo rows, 8 new tokens")


def check_export(out: str, _work: Path) -> None:
    rows = pipe_table(out, "model")
    assert [(r["model"], r["format"], r["dtype"]) for r in rows] == [
        ("tiny-llama", "gguf", "f16"), ("tiny-llama", "gguf", "q8_0")]
    f16, q8 = (number(r["file size"]) for r in rows)
    assert 0 < q8 < f16 and all(number(r["export wall s"]) > 0 for r in rows)


def check_generate(out: str, _work: Path) -> None:
    rows = pipe_table(out, "model")
    assert [(r["variant"], int(r["batch"])) for r in rows] == [
        (v, b) for b in (1, 4) for v in ("base", "unmerged", "merged")]
    for r in rows:
        assert r["model"].startswith("tiny-llama (") and number(r["tokens/s (best)"]) > 0
        assert r["tokens/s (best)"] == r["median"]  # one repeat: the best is the median
        assert r["merged == unmerged"] in (("yes", "NO") if r["variant"] == "merged" else ("",))
    assert all(r["best vs base"] == "1.00x" for r in rows if r["variant"] == "base")


def check_gpu(out: str, work: Path) -> None:
    """bench/gpu_check.sh at toy size on CPU: its user path (train, generate, merge, QLoRA skipped
    without CUDA, estimate, dry run), then bench_gpu.py --quick: each variant in its own process,
    every step timed and the first reported apart, the attention kernel and lora's batches line
    recorded, the CUDA-only variants skipped with their reason; the table into the doc it is given."""
    import json

    for step in ("train: ok", "generate: ok", "merge: ok", "estimate: ok", "dry run: ok", "qlora: skipped"):
        assert step in out, (step, out[-3000:])
    doc = (work / "benchmarks.md").read_text(encoding="utf-8")
    assert doc.startswith("# Benchmarks\n\nbefore\n\n" + GPU_DOC_BEGIN) and doc.endswith(GPU_DOC_END + "\n\nafter\n")
    assert "| toy | 32 | defaults |" in doc and "old table" not in doc

    records = {r["variant"]: r for r in json.loads((work / "out" / "bench_gpu.json").read_text())["records"]}
    assert list(records) == ["source", "defaults", "qlora", "liger"]
    for name in ("source", "defaults"):
        r = records[name]
        assert len(r["step_s"]) == 3 and r["warmup_steps"] == 1 and r["steady_steps"] == 2, r
        assert r["steady_s"] == pytest.approx(sum(r["step_s"][1:]), abs=1e-3)
        assert r["tokens"] > r["supervised_tokens"] > 0 and r["tokens_per_s"] > 0, r
        assert r["estimate_bytes"] > 0 and r["model_tflops"] > 0
        assert r["attention"] == "sdpa" and r["startup_s"] > 0
        if "CPU" in r["device"]:
            assert r["mfu"] is None and r["peak_bytes"] is None  # a CPU has neither figure
    assert records["source"]["pid"] != records["defaults"]["pid"]
    assert "attention sdpa" in records["defaults"]["batches"]
    table = pipe_table(out, "shape")
    assert [(r["shape"], r["seq"], r["variant"]) for r in table] == [("toy", "32", v) for v in records]
    by_variant = {r["variant"]: r for r in table}
    assert by_variant["source"]["vs source"] == "1.00x"
    assert number(by_variant["defaults"]["tokens/s"]) == pytest.approx(records["defaults"]["tokens_per_s"], abs=1)
    if "CPU" in records["source"]["device"]:
        assert "kernels none" in records["defaults"]["batches"]
        assert "CUDA" in records["qlora"]["skipped"] and "CUDA" in records["liger"]["skipped"]
        assert "skipped: Liger's Triton kernels need a CUDA GPU" in by_variant["liger"]["note"]
    assert (work / "out" / "bench_gpu.md").read_text() in out  # the table printed is the one written


def check_preference(out: str, _work: Path) -> None:
    rows = re.findall(r"^(\w+) +(\d+) +([\d.]+) MiB +([\d.]+)x$", out, flags=re.M)
    assert [r[0] for r in rows] == ["sft", "dpo", "orpo", "simpo", "kto"], out
    sft_peak = float(rows[0][2])
    for _, tokens_per_s, peak, ratio in rows:
        assert int(tokens_per_s) > 0 and float(ratio) == pytest.approx(float(peak) / sft_peak, abs=0.01)
    dpo_ratio = re.search(r"^dpo peak memory / sft: ([\d.]+)x", out, flags=re.M).group(1)
    assert dpo_ratio == rows[1][3]


def check_serve(out: str, _work: Path) -> None:
    rows = pipe_table(out, "model")
    assert [(r["model"], r["clients"]) for r in rows] == [("tiny-llama", "1"), ("tiny-llama", "4")]
    for r in rows:
        assert number(r["requests/s"]) > 0 and number(r["output tokens/s"]) > 0
        assert 0 < number(r["p50 s"]) <= number(r["p99 s"])
    assert rows[0]["tokens/s vs 1 client"] == "1.00x"
    assert re.fullmatch(r"[-+]\d+% bare HTTP, [-+]\d+% openai client", rows[0]["1 client vs lora generate"])


def check_train(out: str, _work: Path) -> None:
    rows = pipe_table(out, "model")
    assert [(r["model"], r["workflow"]) for r in rows] == [
        ("tiny-llama (0.9M)", "source workflow, batch 1 x accum 8"), ("tiny-llama (0.9M)", "lora train, defaults")]
    source, lora = rows
    assert source["vs source"] == "1.00x"
    assert ratio_of_rounded(number(lora["vs source"]), number(lora["supervised tokens/s (best)"]),
                            number(source["supervised tokens/s (best)"]))
    for r in rows:
        assert r["supervised tokens/s (best)"] == r["median"]  # one seed
        assert 0 < number(r["final loss, own rows (mean)"]) < 20
    assert re.search(r"tiny-llama: speed-up [\d.]+x", out)


CHECKS = {"bench_checkpoints.py": check_checkpoints, "bench_data.py": check_data, "bench_estimate.py": check_estimate,
          "bench_eval.py": check_eval, "bench_export.py": check_export, "bench_generate.py": check_generate,
          "bench_gpu.py": check_gpu, "bench_preference.py": check_preference, "bench_serve.py": check_serve,
          "bench_train.py": check_train}


# --------------------------------------------------------------------------- running

def quick_command(script: str, base: Path, work: Path) -> tuple[list[str], dict[str, str]]:
    """The command and its extra environment. bench_gpu.py's quick run is the one bench/gpu_check.sh
    makes at toy size (GPU_CHECK_TOY=1), after its user path on the tiny base: one run proves both."""
    if script == "bench_gpu.py":
        doc = work / "benchmarks.md"
        doc.write_text("# Benchmarks\n\nbefore\n\n" + GPU_DOC_BEGIN + "\nold table\n" + GPU_DOC_END + "\n\nafter\n",
                       encoding="utf-8")
        # GPU_CHECK_SECONDS: no toy variant is skipped as "out of time" on a slow or busy machine
        return ["bash", str(BENCH / "gpu_check.sh")], {
            "GPU_CHECK_TOY": "1", "GPU_CHECK_WORK": str(work), "GPU_CHECK_DOC": str(doc),
            "GPU_CHECK_TINY": str(base), "GPU_CHECK_SECONDS": "86400"}
    return [sys.executable, str(BENCH / script), "--quick", "--model", str(base)], {}


def run_quick(script: str, base: Path, work: Path) -> dict:
    """One script's quick run in its own process: exit code, output, wall and CPU seconds. The
    pythons gpu_check.sh starts (PY) are forks of one that imported the libraries once
    (tests/bench/forkserver.py): a process each still, with the ~6 s of imports paid once."""
    work.mkdir(parents=True)
    command, extra_env = quick_command(script, base, work)
    # one torch thread each: two scripts share the two cores, and OpenMP threads spinning for a
    # busy core cost more than twice the CPU time on a loaded machine (measured: 27 s against 12)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TMPDIR": str(work), "OMP_NUM_THREADS": "1",
           **extra_env}
    start = time.perf_counter()
    with forked_pythons(work, env) as forks, (work / "stdout").open("w") as out, (work / "stderr").open("w") as err:
        env.update(PY=str(forks["python"]), FORKSERVER_PYTHON=str(forks["python"]))
        proc = subprocess.Popen(command, cwd=REPO if extra_env else work, env=env, stdout=out, stderr=err)
        try:
            _, status, usage = _wait(proc, TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            proc.wait()
            status, usage = None, None
    return {"code": os.waitstatus_to_exitcode(status) if status is not None else "timeout",
            "out": (work / "stdout").read_text(), "err": (work / "stderr").read_text(),
            "wall_s": time.perf_counter() - start,
            "cpu_s": usage.ru_utime + usage.ru_stime + forks["cpu_s"] if usage else None}


@contextmanager
def forked_pythons(work: Path, env: dict):
    """tests/bench/forkserver.py serving in `work`: yields {"python": the executable standing
    for python}; afterwards "cpu_s" holds the server's CPU seconds, its forks' included."""
    sys.path.insert(0, str(Path(__file__).parent))
    import forkserver

    # a socket path must fit in sun_path (104 bytes on macOS, whose TMPDIR alone is ~50): short, in /tmp
    server_socket = Path(tempfile.mkdtemp(prefix="lora-fs-", dir="/tmp" if os.path.isdir("/tmp") else None)) / "s"
    server = subprocess.Popen([sys.executable, str(Path(forkserver.__file__)), "serve", str(server_socket)],
                              cwd=Path(__file__).parent, env=env, stdout=subprocess.PIPE, text=True)
    forks = {"python": forkserver.wrapper(work, server_socket), "cpu_s": 0.0}
    try:
        assert server.stdout.readline().strip() == "ready", "the fork server did not start"
        yield forks
    finally:
        server.terminate()
        _, _, usage = os.wait4(server.pid, 0)
        server.returncode = 0
        forks["cpu_s"] = usage.ru_utime + usage.ru_stime
        shutil.rmtree(server_socket.parent, ignore_errors=True)


def _wait(proc, timeout: float):
    """os.wait4 on the process (its CPU time, children it waited for included), with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return pid, status, usage
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.1)


def run_preloaded(scripts: list[str], base: Path, root: Path) -> dict[str, dict]:
    """The quick runs of `scripts` through tests/bench/preloaded.py: still a process each, forked
    one after another from a python that imported torch, transformers and peft once (~6 s of
    every quick run's 7-20 s was those imports)."""
    jobs = []
    for script in scripts:
        work = root / script.removesuffix(".py")
        work.mkdir(parents=True)
        command, _ = quick_command(script, base, work)
        jobs.append({"script": command[1], "argv": command[2:], "cwd": str(work), "tmpdir": str(work),
                     "stdout": str(work / "stdout"), "stderr": str(work / "stderr")})
    (root / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("preloaded.py")), str(root / "jobs.json")],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S * len(scripts))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return {script: {**results[script], "out": (root / script.removesuffix(".py") / "stdout").read_text(),
                     "err": (root / script.removesuffix(".py") / "stderr").read_text()} for script in scripts}


@pytest.fixture(scope="module")
def quick_runs(request, tiny_base, tmp_path_factory):
    """The quick runs of the scripts whose tests were selected: bench/gpu_check.sh (bench_gpu.py's)
    as a process of its own, beside the others forked one at a time from a preloaded python."""
    selected = [item.callspec.params["script"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "script" in item.callspec.params]
    root = tmp_path_factory.mktemp("bench")
    plain = [s for s in selected if s != "bench_gpu.py"]
    with ThreadPoolExecutor(2) as pool:
        gpu = pool.submit(run_quick, "bench_gpu.py", tiny_base, root / "bench_gpu") if "bench_gpu.py" in selected else None
        runs = run_preloaded(plain, tiny_base, root) if plain else {}
        if gpu is not None:
            runs["bench_gpu.py"] = gpu.result()
    for script, run in runs.items():
        print(f"{script}: exit {run['code']}, {run['wall_s']:.1f} s wall, {run['cpu_s'] or 0:.1f} s CPU")
    return {script: (run, root / script.removesuffix(".py")) for script, run in runs.items()}


@pytest.fixture(scope="module")
def docs_before():
    return (REPO / "docs" / "benchmarks.md").read_bytes()


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_run_prints_its_table(script, docs_before, quick_runs):
    check = CHECKS[script]  # a new bench script needs its check here
    run, work = quick_runs[script]
    assert run["code"] == 0, f"{script} --quick: exit {run['code']}\n{run['out'][-3000:]}\n{run['err'][-3000:]}"
    assert QUICK_MARK in run["out"], run["out"][-3000:]
    check(run["out"], work)
    assert (REPO / "docs" / "benchmarks.md").read_bytes() == docs_before, "a quick run wrote docs/benchmarks.md"


def test_every_script_has_a_check():
    assert sorted(CHECKS) == SCRIPTS


def test_a_quick_run_refuses_to_write_the_doc(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--quick", "--doc", str(tmp_path / "b.md")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--quick never writes a doc" in done.stderr
    assert not (tmp_path / "b.md").exists()
