"""Run bench scripts' quick runs as tests/bench/test_bench.py asks: each script in its own
process, two at a time, but forked from this one after it has imported torch, transformers and
peft, the ~6 s every fresh python pays before a quick run's seconds of work. Each child runs the
script as `python bench/SCRIPT ARGS` would (`__main__`, its folder first on sys.path, its own
working folder, TMPDIR and output files) and exits with its code.

    python tests/bench/preloaded.py JOBS.json      (a list of {script, argv, cwd, tmpdir, stdout, stderr})

prints one JSON object: {script: {"code", "wall_s", "cpu_s"}}. Linux and macOS (os.fork)."""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import time
import traceback
from pathlib import Path

PARALLEL = int(os.environ.get("PRELOADED_PARALLEL", "1"))
REPO = Path(__file__).resolve().parents[2]


def preload() -> None:
    """What a lora command does first (the libraries' quiet, offline set-up), then the imports."""
    sys.path.insert(0, str(REPO))
    from lora_cli import libraries

    libraries.configure()
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401


def child(job: dict) -> int:
    os.chdir(job["cwd"])
    os.environ["TMPDIR"] = job["tmpdir"]
    tempfile.tempdir = None  # read TMPDIR again
    for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
        os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = [job["script"], *job["argv"]]
    sys.path.insert(0, str(Path(job["script"]).parent))  # as `python bench/SCRIPT` puts bench/ first
    try:
        runpy.run_path(job["script"], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported in the job's stderr, as python itself would
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    preload()
    waiting, running, results = list(jobs), {}, {}
    while waiting or running:
        while waiting and len(running) < PARALLEL:
            job = waiting.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os._exit(child(job))
            running[pid] = (job, time.perf_counter())
        pid, status, usage = os.wait4(-1, 0)
        job, start = running.pop(pid)
        results[Path(job["script"]).name] = {"code": os.waitstatus_to_exitcode(status),
                                             "wall_s": time.perf_counter() - start,
                                             "cpu_s": usage.ru_utime + usage.ru_stime}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
