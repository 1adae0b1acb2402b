"""`lora serve --engine vllm`: hand serving to vLLM's own OpenAI server, set up so that the same
client code works against it as against `lora serve`: the base served as `base`, every adapter
as a LoRA module under its name, and a chat template that renders conversations as training did.

The chat template is template.jinja_chat_template (the one generator `lora export` uses too),
with bos_token in front: vLLM tokenises the rendered text without adding special tokens. A test
renders it with the tokenizer and compares the text with template.prompt_ids'."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from lora_cli.files import atomic
from lora_cli.errors import LoraError
from lora_cli.infer.generate import BASE
from lora_cli.data.template import TemplateSpec, jinja_chat_template
from lora_cli.model.adapter_folder import verify_adapter
from lora_cli.model.load import load_tokenizer

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def max_lora_rank(infos: dict) -> int:
    """The smallest rank vLLM accepts that holds every adapter's r."""
    ranks = [int(i.config.get("r") or 0) for i in infos.values()]
    need = max(ranks, default=8)
    for allowed in VLLM_LORA_RANKS:
        if allowed >= need:
            return allowed
    raise LoraError(f"adapter rank {need} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")


def one_template(infos: dict) -> TemplateSpec:
    """vLLM serves one chat template: every adapter must have been trained with the same one."""
    specs = {name: i.template for name, i in infos.items()}
    if len(set(specs.values())) > 1:
        listing = ", ".join(f"{n} -> {s.name}" for n, s in specs.items())
        raise LoraError(f"--engine vllm serves one chat template, but the adapters were trained with different ones ({listing})",
                        "serve adapters of one template together, or use --engine transformers")
    return next(iter(specs.values()), TemplateSpec())


def vllm_command(infos: dict, base: str, chat_template_file: Path, *, host: str, port: int,
                 api_key: str | None = None) -> list[str]:
    """vLLM's OpenAI server command line for base + adapters (what `lora serve --engine vllm` runs)."""
    argv = ["vllm", "serve", base, "--host", host, "--port", str(port), "--served-model-name", BASE,
            "--chat-template", str(chat_template_file)]
    if infos:
        argv += ["--enable-lora", "--max-loras", str(len(infos)), "--max-lora-rank", str(max_lora_rank(infos)),
                 "--lora-modules", *[f"{name}={info.path}" for name, info in infos.items()]]
    if api_key:
        argv += ["--api-key", api_key]
    return argv


def missing_for_vllm() -> list[str]:
    """What this machine lacks to run vLLM: the package, its command, a CUDA GPU."""
    missing = []
    if importlib.util.find_spec("vllm") is None or shutil.which("vllm") is None:
        missing.append("vLLM is not installed (pip install vllm, on a machine with a CUDA GPU)")
    try:
        import torch

        if not torch.cuda.is_available():
            missing.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    except ImportError:
        missing.append("torch is not installed")
    return missing


def prepare_vllm(adapters: dict, *, base: str | None, host: str, port: int, api_key: str | None,
                 work_dir: Path) -> list[str]:
    """Read the adapters, write the chat template into work_dir, return vLLM's command line."""

    infos = {name: verify_adapter(path) for name, path in adapters.items()}  # vLLM gets only whole adapters
    if BASE in infos:
        raise LoraError(f"--adapter: the name {BASE!r} is taken by the base model", "give that adapter another NAME=DIR")
    first = next(iter(infos.values()), None)
    if first is None and not base:
        raise LoraError("nothing to serve", "pass --adapter NAME=DIR, or --base MODEL for the base alone")
    base_model = base or first.model_section.get("name_or_path") or first.base
    tokenizer_source = str(first.path) if first and (first.path / "tokenizer_config.json").is_file() else base_model
    template_text = jinja_chat_template(one_template(infos), load_tokenizer(tokenizer_source), bos=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    chat_template_file = work_dir / "chat_template.jinja"
    atomic.write_text(chat_template_file, template_text)
    return vllm_command(infos, base_model, chat_template_file, host=host, port=port, api_key=api_key)
