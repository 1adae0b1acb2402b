"""The one place that sets up the libraries lora builds on: offline and quiet by default.

`configure` runs when the CLI starts, before any heavy library is imported, because several of
them read their switches at import time. A switch the user has set in the environment
(TRANSFORMERS_VERBOSITY, USE_HUB_KERNELS, ...) is never overridden: each is set only when absent.
`quiet_libraries` is also called by the loading functions themselves, so code that calls them
directly (tests, scripts) gets the same quiet terminal."""

from __future__ import annotations

import logging
import os
import sys
import warnings

# The libraries' loggers, and the variable with which each lets a user pick its verbosity.
LOGGERS = {
    "transformers": "TRANSFORMERS_VERBOSITY",
    "datasets": "DATASETS_VERBOSITY",
    "huggingface_hub": "HF_HUB_VERBOSITY",
    "accelerate": "ACCELERATE_LOG_LEVEL",
    "peft": None,
    "trl": None,
    "bitsandbytes": None,
    "kernels": None,
    "torch": None,
    "httpx": None,
    "lm_eval": None,  # lora eval --tasks: its task warnings (a default aggregation taken, ...)
}

_verbose = False


def hub_kernels_allowed() -> bool:
    """Hub kernels are code fetched from the hub at run time: only when the user asks for them
    with transformers' own switch, USE_HUB_KERNELS=1."""
    return os.environ.get("USE_HUB_KERNELS", "NO").strip().upper() in {"1", "ON", "YES", "TRUE"}


def configure(verbose: bool = False) -> None:
    """Offline and quiet, before torch, transformers, peft or bitsandbytes is imported."""
    global _verbose
    _verbose = verbose
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("USE_HUB_KERNELS", "NO")  # transformers' switch for hub kernels
    if not hub_kernels_allowed():
        # bitsandbytes' CPU backend calls kernels.get_kernel(<a hub repo>) when it is imported
        # (peft imports it): a network lookup and downloaded code on every command. It falls
        # back to its own kernels when `kernels` cannot be imported; None in sys.modules is
        # Python's documented way to make that import fail, and transformers then reports
        # kernels as unavailable too, which USE_HUB_KERNELS=NO already asks of it.
        sys.modules.setdefault("kernels", None)
    if not verbose:
        # libraries' progress bars are tqdm (transformers' weight loading, datasets' split
        # generation, lm-eval's request loop); lora's own progress is rich. tqdm reads TQDM_*
        # when it is imported, which is why this is set here, before any of them is
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        _quiet_loggers()  # before the imports: bitsandbytes, for one, logs while being imported


def _quiet_loggers() -> None:
    for name, variable in LOGGERS.items():
        if variable is None or variable not in os.environ:
            logging.getLogger(name).setLevel(logging.ERROR)


def verbose() -> bool:
    """Whether the command runs with -v/--verbose (every library line let through)."""
    return _verbose


def quiet_libraries() -> None:
    """No library line on stderr during a normal command: loggers at ERROR unless the user set
    the library's own verbosity variable, deprecation chatter from the libraries' own modules
    filtered (a warning lora must act on is handled where it arises, not hidden here), and no
    per-shard progress bars. With --verbose everything goes through."""
    if _verbose:
        return
    _quiet_loggers()
    libraries = r"(transformers|peft|accelerate|datasets|bitsandbytes|huggingface_hub|torch|trl)(\.|$)"
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=libraries)
    warnings.filterwarnings("ignore", message=r".*requires_grad=True to a scalar.*")
    import transformers  # its callers load models next; its logging module is its own

    if os.environ.get("TRANSFORMERS_VERBOSITY", "error") == "error":
        transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def install_hint(extra: str) -> str:
    """The pip command that installs an optional part of lora: the packages its extra declares
    in pyproject.toml (read from the installed metadata), since lora itself is installed from
    its checkout, not from a package index."""
    import re
    from importlib import metadata

    try:
        requirements = metadata.requires("lora-cli") or []
    except metadata.PackageNotFoundError:
        requirements = []
    marker = re.compile(rf"""extra\s*==\s*["']{re.escape(extra)}["']""")
    packages = [r.split(";")[0].strip().replace(" ", "") for r in requirements if marker.search(r)]
    if not packages:
        return f"pip install -e '.[{extra}]' in the lora checkout"
    return "pip install " + " ".join(f"'{p}'" for p in packages)
