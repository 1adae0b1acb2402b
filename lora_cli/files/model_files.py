"""Model folders and weight files checked before anything loads them: pickle-only adapter
weights refused, a base folder's config.json and whole safetensors headers, a tokenizer folder's
vocabulary. Nothing here imports torch."""

from __future__ import annotations

from pathlib import Path

from lora_cli.errors import LoraError
from lora_cli.files.inputs import first_line

# --------------------------------------------------------------------------- weight files

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def refuse_pickle_weights(folder: str | Path, what: str) -> None:
    """An adapter folder whose weights are only pickles: refused, because loading a pickle can
    run whatever code it holds, and its shapes cannot be checked without loading it."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise LoraError(f"{what} {folder}: weights only as pickle files ({', '.join(pickles[:3])}), "
                        "which can run arbitrary code when loaded; lora reads safetensors only",
                        "convert them once, in an environment you trust: load with transformers/peft and "
                        "save_pretrained(..., safe_serialization=True)")


def verify_model_folder(path: str, what: str = "model.name_or_path") -> None:
    """A local base model folder, before transformers loads it: it has a config.json, and each
    safetensors file's header is whole (a truncated shard is named instead of failing deep
    inside). Pickle-only (*.bin) bases are left to transformers' torch.load(weights_only=True),
    which loads plain tensors and refuses anything else (load_base_model turns that into exit 2)."""
    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id, or a path transformers reports itself
    if not (folder / "config.json").is_file():
        raise LoraError(f"{what} {folder}: no config.json, so this is not a model folder",
                        "point it at the folder save_pretrained wrote (config.json, *.safetensors, tokenizer)")
    for file in sorted(folder.glob("*.safetensors")):
        safetensors_shapes(file)


TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def verify_tokenizer_folder(path: str) -> None:
    """A local folder given as a tokenizer holds a vocabulary file (else transformers fails
    with a message that does not say what is missing)."""
    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        raise LoraError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_VOCAB_FILES)})",
                        "copy the tokenizer next to the model (tokenizer.save_pretrained(folder))")


def safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header, after checking that the header
    parses and the data it describes is all there (a truncated copy fails here)."""
    from safetensors import safe_open

    try:
        size = file.stat().st_size
        with safe_open(str(file), framework="numpy") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except OSError as e:
        raise LoraError(f"{file}: cannot be read ({e.strerror or e})", "check the file and its permissions") from None
    except Exception as e:  # safetensors raises its own SafetensorError for every damaged header
        raise LoraError(f"{file}: not a complete safetensors file ({size:,} bytes; {first_line(e)})",
                        "the file is damaged or was cut off while copying; copy or export it again") from None
