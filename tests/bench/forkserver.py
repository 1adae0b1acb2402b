"""A python that answers `python ARGS` by forking itself after it imported torch, transformers
and peft (tests/bench/preloaded.py's preload), for bench/gpu_check.sh's toy run: every one of
its pythons (the device probe, five `lora` commands, bench_gpu.py and the process it starts for
each variant) paid those ~6 s of imports again; forked, each is still a process of its own, with
its own arguments, working folder, environment, standard streams and exit code.

    python tests/bench/forkserver.py serve SOCKET        prints "ready" once it answers
    python -I tests/bench/forkserver.py run SOCKET ARGS  what `python ARGS` would do, in a fork

`wrapper()` writes the executable that stands for python (gpu_check.sh's PY); a forked program
sees it as sys.executable, so the processes it starts go through the server too. Understood:
`-c CODE`, `-m MODULE` and `SCRIPT`, each with its arguments. Linux and macOS (os.fork, fd passing)."""

from __future__ import annotations

import gc
import json
import os
import runpy
import select
import signal
import socket
import sys
import traceback
from pathlib import Path

MAX_REQUEST = 1 << 20


def wrapper(folder: Path, socket_path: Path) -> Path:
    """An executable `python` in `folder` whose every run is answered by the server at socket_path."""
    path = Path(folder) / "python"
    path.write_text(f'#!/bin/sh\nexec {sys.executable} -I {Path(__file__).resolve()} run {socket_path} "$@"\n',
                    encoding="utf-8")
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------- client

def run(socket_path: str, argv: list[str]) -> int:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(socket_path)
    request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    socket.send_fds(client, [len(request).to_bytes(8, "big") + request], [0, 1, 2])
    answer = b""
    while chunk := client.recv(64):
        answer += chunk
    if not answer:
        return 1  # the server went away before the program ended
    code = int(answer)
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


# --------------------------------------------------------------------------- server

def serve(socket_path: str) -> None:
    from preloaded import preload

    preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(16)
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}  # forked program -> its client, told the exit code at the end
    while True:
        ready, _, _ = select.select([listener], [], [], 0.02)
        if ready:
            conn, _ = listener.accept()
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in waiting.values():
                    other.close()
                _become(conn)  # never returns: the program's own exit ends this process
            waiting[pid] = conn
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = waiting.pop(pid)
            conn.sendall(str(os.waitstatus_to_exitcode(status)).encode())
            conn.close()


def _become(conn: socket.socket) -> None:
    """In the fork: take the client's streams, folder and environment, then run its program."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    header, fds, _, _ = socket.recv_fds(conn, 8, 3)
    size = int.from_bytes(header, "big")
    body = b""
    while len(body) < size:
        body += conn.recv(min(MAX_REQUEST, size - len(body)))
    conn.close()
    request = json.loads(body)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # the programs this one starts as `sys.executable ...` (bench_gpu.py's variants) come here too
    sys.executable = os.environ.get("FORKSERVER_PYTHON", sys.executable)
    code = _run_program(request["argv"])
    gc.freeze()  # as lora's own main: teardown need not trace the preloaded libraries again
    sys.exit(code)


def _run_program(argv: list[str]) -> int:
    """`python ARGV` in this process: its sys.argv and sys.path[0] as python sets them."""
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.path[:1] = extra + [""]  # the server's own folder goes; -c and -m look in the working folder
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        elif argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[len(extra)] = str(Path(argv[0]).resolve().parent)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - what python itself prints for an uncaught error
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(run(sys.argv[2], sys.argv[3:]))
