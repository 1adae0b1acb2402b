"""Base model, tokenizer and adapters: the one loading path training and inference share."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

from lora_cli.model.adapters import refuse_base_changing_with_others
from lora_cli.errors import LoraError
from lora_cli.libraries import install_hint, quiet_libraries
from lora_cli.model.adapter_folder import AdapterInfo, verify_adapter
from lora_cli.files.model_files import verify_model_folder, verify_tokenizer_folder
from lora_cli.tasks import bind_tokenizer, check_model_can, get_task, load_kwargs
from lora_cli.model.kernels import choose_attention, DeviceFacts
from lora_cli.recipe.schema import ModelConfig


# --------------------------------------------------------------------------- devices and dtypes

def local_device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def resolve_dtype(name: str):
    """'auto' is bfloat16 on a GPU that has it, float32 elsewhere (CPU half precision is slow)."""
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


# --------------------------------------------------------------------------- tokenizer

# --------------------------------------------------------------------------- remote code

REMOTE_CODE_HINT = ("lora runs no Python shipped in a model, tokenizer or adapter folder unless you allow it; "
                    "if you trust its author: --trust-remote-code on the command line, or "
                    "model.trust_remote_code: true in your own recipe")


def remote_code_asked(path: str | Path) -> list[str]:
    """What a local model or tokenizer folder asks to run: its `auto_map` entries
    ('config.json: AutoModelForCausalLM -> modeling_x.Model'). Empty for a hub id or no request."""
    folder = Path(path)
    asked = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if isinstance(auto_map, dict):
            asked += [f"{name}: {kind} -> {target}" for kind, target in auto_map.items()]
    return asked


def refuse_remote_code(path: str | Path, what: str, hint: str = REMOTE_CODE_HINT) -> None:
    """Called when loading without remote code failed: when the folder asked for code, that is
    the reason, and the user is told what it asked for and how to allow it."""
    asked = remote_code_asked(path)
    if asked:
        shown = "; ".join(str(a)[:200] for a in asked[:4]) + ("; ..." if len(asked) > 4 else "")
        raise LoraError(f"{what} {str(path)!r} asks to run Python code shipped with it ({shown})", hint)


# --------------------------------------------------------------------------- tokenizer

def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer, with a pad token. When it has none, EOS doubles as pad: safe because
    labels are masked by position (PadCollator), never by comparing ids with the pad id.
    trust_remote_code comes from the user (command line or own recipe), never from a folder."""
    quiet_libraries()
    from transformers import AutoTokenizer

    verify_tokenizer_folder(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=bool(trust_remote_code))
    except (OSError, ValueError) as e:
        if not trust_remote_code:
            refuse_remote_code(path, "tokenizer")
        raise LoraError(f"cannot load a tokenizer from {path!r}: {_first_line(e)}",
                        "check model.name_or_path: a local model folder or a hub id "
                        "(hub ids need network access)") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise LoraError(f"tokenizer at {path!r} has neither a pad nor an EOS token",
                            "use a tokenizer with an EOS token; the model must learn when to stop")
        tok.pad_token = tok.eos_token
    return tok


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------------- base model

def quantization_config(model_cfg, sharded: bool = False):
    """BitsAndBytesConfig for the recipe, or None. 4bit is QLoRA: NF4 with double quantization.
    sharded (FSDP / DeepSpeed ZeRO-3): the packed 4-bit weights are stored in the model's dtype,
    as the peft/bitsandbytes FSDP-QLoRA recipe requires, so they flatten with the other weights."""
    if model_cfg.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoraError(f"model.quantization: {model_cfg.quantization} needs bitsandbytes, which is not installed",
                        f"{install_hint('quant')}, or set model.quantization: none") from None
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=resolve_dtype(model_cfg.dtype),
        **({"bnb_4bit_quant_storage": resolve_dtype(model_cfg.dtype)} if sharded else {}),
    )


def load_base_model(model_cfg, *, quantize: bool = True, dtype=None, device: str | None = None,
                    sharded: bool = False, training: bool = False):
    """The model.task's Auto class (AutoModelForCausalLM by default) from a folder or hub id.
    quantize=False reloads a QLoRA base in full precision (what merging needs). sharded: FSDP /
    ZeRO-3 will place the weights, so no device_map. training: the attention kernel is chosen
    for training (lora_cli.model.kernels)."""
    quiet_libraries()

    check_model_can(model_cfg)
    kwargs = {
        "dtype": dtype or resolve_dtype(model_cfg.dtype),
        "trust_remote_code": bool(model_cfg.trust_remote_code),
        **load_kwargs(model_cfg),
    }
    attn = resolve_attn_implementation(model_cfg, training)
    if attn:
        kwargs["attn_implementation"] = attn

    verify_model_folder(model_cfg.name_or_path)  # pickles refused, truncated shards named, before loading
    qconfig = quantization_config(model_cfg, sharded) if quantize else None
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        if not sharded:
            kwargs["device_map"] = {"": device or local_device()}
    try:
        model = get_task(model_cfg.task).model_class().from_pretrained(model_cfg.name_or_path, **kwargs)
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met more than tensors
        raise LoraError(f"model.name_or_path {model_cfg.name_or_path!r}: its pickle weights (*.bin) do not load as "
                        f"plain tensors, and lora never runs code from a pickle ({_first_line(e)[:200]})",
                        "use a copy of the model saved as safetensors (save_pretrained(..., safe_serialization=True), "
                        "in an environment you trust)") from None
    except (OSError, ValueError) as e:
        if not model_cfg.trust_remote_code:
            refuse_remote_code(model_cfg.name_or_path, "model.name_or_path")
        raise LoraError(f"cannot load model.name_or_path {model_cfg.name_or_path!r}: {_first_line(e)}",
                        "give a local folder with config.json and weights, or a hub id "
                        "(hub ids need network access)") from None
    if device and qconfig is None:
        model.to(device)
    return model


def resolve_attn_implementation(model_cfg, training: bool = False) -> str | None:
    """The attention kernel to ask transformers for: the recipe's, or for auto the fastest one
    this machine has for the model (lora_cli.model.kernels.choose_attention): flash_attention_2, else
    for training flex attention, on a CUDA GPU; otherwise None, with which transformers takes
    sdpa where the model has it, else eager. Inference never gets flex attention: generation
    changes shapes every token, and each new shape would compile it again."""

    if model_cfg.attn_implementation not in (None, "auto"):
        return model_cfg.attn_implementation
    chosen = choose_attention("auto", device_facts(model_cfg))
    return chosen if training or chosen != "flex_attention" else None


def device_facts(model_cfg, free_bytes: int | None = None):
    """The facts of this machine, for this model (config.json read, no weights)."""
    import importlib.util

    import torch
    from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

    cuda = torch.cuda.is_available()
    cls = causal_lm_class(model_cfg) if cuda else None
    return DeviceFacts(
        cuda=cuda, half=resolve_dtype(model_cfg.dtype) in (torch.bfloat16, torch.float16),
        flash_attn=cuda and is_flash_attn_2_available(), flex_attention=is_torch_flex_attn_available(),
        model_flash=bool(getattr(cls, "_supports_flash_attn", False)),
        model_flex=bool(getattr(cls, "_supports_flex_attn", False)),
        liger=importlib.util.find_spec("liger_kernel") is not None, free_bytes=free_bytes)


def gpu_facts(model_cfg):
    """What a CUDA GPU with this machine's packages would have: what `lora estimate` assumes."""
    import importlib.util

    from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

    cls = causal_lm_class(model_cfg)
    return DeviceFacts(
        cuda=True, half=model_cfg.dtype in ("auto", "bfloat16", "float16"),
        flash_attn=is_flash_attn_2_available(), flex_attention=is_torch_flex_attn_available(),
        model_flash=bool(getattr(cls, "_supports_flash_attn", False)),
        model_flex=bool(getattr(cls, "_supports_flex_attn", False)),
        liger=importlib.util.find_spec("liger_kernel") is not None)


def causal_lm_class(model_cfg):
    """The transformers class AutoModelForCausalLM would build, read from config.json alone;
    None for remote code or an unknown architecture."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=bool(model_cfg.trust_remote_code))
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (OSError, ValueError, KeyError):
        return None


def attention_in_use(model) -> str | None:
    """The attention kernel a loaded model runs (sdpa, eager, flash_attention_2, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "_attn_implementation", None)


def masks_from_positions(model) -> bool:
    """Whether the model builds its causal mask with transformers' masking_utils
    (create_causal_mask), which reads position_ids restarting at 0 in a row with no
    attention_mask as separate sequences and masks them block-diagonally. A model that does
    not (BLOOM's ALiBi, model code not yet moved to masking_utils) would let examples that
    share a row attend to each other, so it never gets flattened rows by default."""
    import inspect
    import sys

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = sys.modules.get(type(base).__module__)
    forward = getattr(base, "forward", None)
    return (getattr(module, "create_causal_mask", None) is not None and forward is not None
            and "position_ids" in inspect.signature(forward).parameters)


# --------------------------------------------------------------------------- parameter counts

def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) exactly as peft's print_trainable_parameters counts them."""
    return model.get_nb_trainable_parameters()


def format_parameter_counts(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


# --------------------------------------------------------------------------- saved adapters

def inference_model_config(info: AdapterInfo, base: str | None = None, quantization: str | None = None,
                           trust_remote_code: bool = False):
    """The model section to load for inference: the training recipe's, with overrides.
    An adapter folder is data someone may have downloaded: the recipe saved in it never
    switches remote code on; only the user's own command line (trust_remote_code) does."""

    section = {k: v for k, v in info.model_section.items() if k in ModelConfig.__dataclass_fields__}
    section["name_or_path"] = base or section.get("name_or_path") or info.base
    section["trust_remote_code"] = bool(trust_remote_code)
    if quantization is not None:
        section["quantization"] = quantization
    return ModelConfig(**section)


def load_for_inference(adapters: dict[str, str | Path], *, base: str | None = None,
                       quantization: str | None = None, device: str | None = None,
                       trust_remote_code: bool = False):
    """Base once, then every named adapter on it. Returns (model, tokenizer, infos by name).
    With no adapters, the base alone (model_cfg built from `base`). trust_remote_code is the
    user's --trust-remote-code, never read from the adapters."""
    quiet_libraries()
    from peft import PeftModel

    infos = {name: verify_adapter(p) for name, p in adapters.items()}
    first = next(iter(infos.values()), None)
    if first is None:
        if not base:
            raise LoraError("nothing to load", "pass --adapter DIR, or --base MODEL for the base alone")
        model_cfg = ModelConfig(name_or_path=base, quantization=quantization or "none",
                                trust_remote_code=bool(trust_remote_code))
    else:
        model_cfg = inference_model_config(first, base, quantization, trust_remote_code)
        _check_same_base(infos)
        refuse_base_changing_with_others(infos)
    device = device or local_device()
    tokenizer_source = str(first.path) if first and (first.path / "tokenizer_config.json").is_file() else model_cfg.name_or_path
    tokenizer = load_tokenizer(tokenizer_source, model_cfg.trust_remote_code)
    model = load_base_model(model_cfg, device=device)
    bind_tokenizer(model, tokenizer)
    for i, (name, info) in enumerate(infos.items()):
        if i == 0:
            model = PeftModel.from_pretrained(model, str(info.path), adapter_name=name)
        else:
            model.load_adapter(str(info.path), adapter_name=name)
    model.eval()
    return model, tokenizer, infos


def _check_same_base(infos: dict[str, AdapterInfo]) -> None:
    bases = {name: _base_key(i.base) for name, i in infos.items()}
    if len(set(bases.values())) > 1:
        listing = ", ".join(f"{n} -> {infos[n].base}" for n in bases)
        raise LoraError(f"adapters were trained on different base models ({listing})",
                        "load adapters of one base together; run the others in a separate session")
    tasks = {name: get_task(i.model_section.get("task")).name for name, i in infos.items()}
    if len(set(tasks.values())) > 1:  # each task loads its own model class and head
        listing = ", ".join(f"{n} -> {t}" for n, t in tasks.items())
        raise LoraError(f"adapters of different model.task cannot share one model ({listing})",
                        "load adapters of one task together")
    types = {name: i.peft_type for name, i in infos.items()}
    if len(set(types.values())) > 1:  # peft keeps one tuner type per model
        listing = ", ".join(f"{n} -> {t}" for n, t in types.items())
        raise LoraError(f"adapters of different kinds cannot share one model ({listing})",
                        "load adapters of one kind together; run the others in a separate session")


def _base_key(base: str) -> str:
    return re.sub(r"/+$", "", str(Path(base).resolve()) if Path(base).exists() else base)
