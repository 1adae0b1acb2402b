"""`lora --version` and `lora env`: what a bug report needs to say about this machine.

Versions come from the installed packages' metadata (no import), so a broken or missing
package is reported instead of crashing the report; only the device line imports torch."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from lora_cli import __version__

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "trl", "filelock", "typer")


def lora_version() -> str:
    try:
        return metadata.version("lora-cli")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed

        return __version__


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def device_line() -> str:
    """The accelerator torch sees: CUDA GPUs by name, Apple's MPS, or the CPU."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - the report must still print
        return f"unknown (torch does not import: {type(e).__name__})"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        cuda = torch.version.cuda or torch.version.hip or "?"
        return f"cuda {cuda}: {len(names)} x {', '.join(sorted(set(names)))}"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps (Apple GPU)"
    return f"cpu ({platform.processor() or platform.machine()}), no GPU"


def environment() -> dict[str, str]:
    """Ordered name -> value lines of `lora env` (also its --json layout)."""
    report = {"lora": lora_version(),
              "python": f"{platform.python_version()} ({sys.executable})",
              "platform": platform.platform()}
    report.update({name: package_version(name) for name in PACKAGES})
    report["device"] = device_line()
    return report
