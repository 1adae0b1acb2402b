"""Offline and quiet by default: the real commands, one after another as a user runs them,
reach no network address and print nothing on stderr that is not lora's own.

They run in one child process (one start-up instead of ten), with HF_HUB_OFFLINE and the
other switches unset, as on a user's machine; a guard in that process refuses and records
every connection or name lookup that is not for this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import make_recipe

DRIVER = textwrap.dedent('''
    import ipaddress, json, socket, sys

    attempts = []

    def _local(host):
        if host in (None, "localhost", ""):
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def _refuse(what, host):
        attempts.append(f"{what} {host}")
        raise OSError(101, f"network is unreachable (test guard: {what} {host})")

    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if not _local(host if isinstance(host, str) else None):
            _refuse("lookup", host)
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(host):
            _refuse("connect", host)
        return real_connect(self, address)

    socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect

    from lora_cli.cli import run

    codes = []
    for argv in json.loads(sys.argv[1]):
        print("=== lora " + " ".join(argv), flush=True)
        codes.append(run(argv))
    print("RESULT " + json.dumps({"codes": codes, "attempts": attempts}), flush=True)
''')

NETWORK_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "USE_HUB_KERNELS",
                    "TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_HUB_VERBOSITY")


@pytest.mark.slow
def test_commands_reach_no_network_and_keep_stderr_for_lora(tmp_path, tiny_random):
    recipe = make_recipe(tmp_path, tiny_random, train={"max_steps": 2, "logging_steps": 1},
                         lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    run = tmp_path / "run"
    commands = [
        ["check", recipe],
        ["estimate", recipe],
        ["data", "preview", recipe],
        ["train", recipe],
        ["generate", "--adapter", run, "--max-new-tokens", "3", "hello"],
        ["merge", "--adapter", run, "--out", tmp_path / "merged"],
        ["save", run, "--out", tmp_path / "saved"],
        ["export", "--adapter", run, "--format", "gguf", "--dtype", "f32", "--out", tmp_path / "model.gguf"],
        ["analyze", run],
        ["generate", "--base", tmp_path / "merged", "--max-new-tokens", "3", "hello"],
    ]
    env = {k: v for k, v in os.environ.items() if k not in NETWORK_SWITCHES}
    env["LORA_CACHE_DIR"] = str(tmp_path / "data-cache")
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([[str(w) for w in c] for c in commands])],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    result_line = next((line for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    assert proc.returncode == 0 and result_line, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(result_line.removeprefix("RESULT "))
    assert result["codes"] == [0] * len(commands), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["attempts"] == [], f"commands reached for the network: {result['attempts']}"
    assert proc.stderr == "", f"library output on stderr:\n{proc.stderr[-3000:]}"
