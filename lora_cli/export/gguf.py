"""`lora export`: a trained adapter as a file llama.cpp and Ollama run.

  --format gguf          the adapter merged into its base (exactly as `lora merge` merges), one GGUF file
  --format gguf-adapter  the LoRA adapter alone, a GGUF LoRA file llama.cpp applies to a GGUF base
  --format ollama        a folder: the merged GGUF plus a Modelfile (TEMPLATE, SYSTEM, stop)

The ggml project's `gguf` library writes the file and names the tensors (its tensor-name map);
this module supplies only what it cannot know: which Hugging Face architecture is which GGUF
architecture, the query/key row order llama.cpp's rotary layout expects for Llama, the
tokenizer's pre-tokenizer name, and the chat template, generated from the one template
definition in template.py so that llama.cpp and Ollama render the text training rendered.

--out is checked and written through lora_cli.files.ownership (check_output, writing_file,
writing_folder): staged beside its target and renamed into place, so a failure (a full disk
included) leaves nothing half-written; an existing target is replaced only with --force and only
when `lora export` wrote it (its file claim, or the folder's claim for an Ollama folder).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from lora_cli.files import ownership
from lora_cli.ui import progress
from lora_cli.errors import LoraError
from lora_cli.data.template import adds_bos, jinja_chat_template, resolve_template
from lora_cli.libraries import install_hint, quiet_libraries
from lora_cli.model.load import inference_model_config, load_tokenizer, refuse_remote_code
from lora_cli.export.merge import check_mergeable, merged_model
from lora_cli.model.adapter_folder import verify_adapter

DTYPES = ("f32", "f16", "bf16", "q8_0")
OWNER_KEY = "lora_cli.export.written_by"  # GGUF metadata naming the writer (ownership is the file claim)
OWNER_VALUE = "lora export"
MODELFILE_HEADER = "# Written by `lora export --format ollama`."
OLLAMA_GGUF = "model.gguf"


@dataclass(frozen=True)
class Architecture:
    """A Hugging Face model_type llama.cpp runs, and what its GGUF needs beyond the library."""
    gguf_name: str          # gguf.MODEL_ARCH member name
    permute_qk: bool        # llama.cpp's LLAMA rope pairs adjacent rows; HF's rotate_half pairs halves


ARCHITECTURES = {
    "llama": Architecture("LLAMA", permute_qk=True),
    "qwen2": Architecture("QWEN2", permute_qk=False),  # NEOX rope in llama.cpp: HF's row order as is
}

# Hugging Face pre-tokenizer regexes (as tokenizer.json spells them) -> llama.cpp's pre-tokenizer name.
# A plain ByteLevel pre-tokenizer (GPT-2's regex, what `lora build-tiny` makes) is "gpt-2".
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LoraError("lora export needs the `gguf` library, which is not installed",
                        install_hint("export")) from None
    return gguf


# --------------------------------------------------------------------------- chat templates

def _go_str(text: str) -> str:
    """A Go template string action: JSON string syntax is a valid Go interpreted string literal."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _go_format(fmt: str, values: dict[str, str]) -> str:
    parts = []
    for piece in re.split(r"(\{\w+\})", fmt):
        name = piece[1:-1] if re.fullmatch(r"\{\w+\}", piece) else None
        parts.append("{{ " + values[name] + " }}" if name in values else (_go_str(piece) if piece else ""))
    return "".join(parts)


def ollama_template(spec, eos_token: str) -> str:
    """The training template as an Ollama (Go text/template) TEMPLATE over .Messages. Ollama
    messages have no alpaca input, so a user turn is the template's without-input form, and Go
    templates cannot trim, so human_assistant's strip of trailing whitespace is not applied."""

    spec = resolve_template(spec)
    if spec.name == "chat_template":
        raise LoraError("--format ollama: the adapter was trained with the tokenizer's own Jinja chat template, "
                        "which Ollama's Go templates cannot reproduce exactly",
                        "use --format gguf (llama.cpp reads the embedded Jinja template), or train with "
                        "template: human_assistant, alpaca or custom")
    tpl = spec.text_template()
    content = "$m.Content"
    return "".join([
        "{{ range $i, $m := .Messages }}",
        '{{ if eq $m.Role "system" }}', _go_format(tpl.system_format, {"system": content}),
        '{{ else if eq $m.Role "user" }}', _go_format(tpl.without_input, {"instruction": content}),
        _go_str(tpl.answer_cue) if tpl.answer_cue else "",
        # Ollama always renders for the next answer, so a finished turn is always followed by one.
        '{{ else if eq $m.Role "assistant" }}{{ $m.Content }}', _go_str(eos_token),
        _go_str(tpl.turn_separator) if tpl.turn_separator else "",
        "{{ end }}{{ end }}",
    ])


def modelfile(spec, eos_token: str, gguf_name: str = OLLAMA_GGUF) -> str:
    spec = resolve_template(spec)
    lines = [MODELFILE_HEADER, f"FROM ./{gguf_name}", f'TEMPLATE """{ollama_template(spec, eos_token)}"""']
    if spec.system_prompt:
        if '"""' in spec.system_prompt:
            raise LoraError('--format ollama: data.system_prompt contains """, which a Modelfile cannot quote')
        lines.append(f'SYSTEM """{spec.system_prompt}"""')
    lines.append(f"PARAMETER stop {json.dumps(eos_token, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- tokenizer

def tokenizer_pre(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (its split regex), or a clear refusal."""
    model = tokenizer_json.get("model") or {}
    decoder = tokenizer_json.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise LoraError("lora export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style); "
                        f"this one is {model.get('type')} with a {decoder.get('type')} decoder",
                        "export with llama.cpp's own convert_hf_to_gguf.py from a merged model (lora merge)")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2"
    regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if len(regexes) == 1 and regexes[0] in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[regexes[0]]
    raise LoraError(f"lora export does not know this tokenizer's pre-tokenizer ({json.dumps(pre)[:200]})",
                    f"supported: plain ByteLevel (gpt-2) and the {', '.join(sorted(set(PRE_TOKENIZERS.values())))} split rules")


def add_tokenizer(writer, tokenizer, tokenizer_dir: Path, n_vocab: int, chat_template: str) -> None:
    """Vocabulary, merges, token types, special ids, add_bos and the chat template. Ids and
    add_bos come from the tokenizer training used (pad is EOS when it had none, as in training)."""
    gguf = _gguf()

    tokenizer_json = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre(tokenizer_json))
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    beyond = sorted(t for i, t in by_id.items() if i >= n_vocab)
    if beyond:
        raise LoraError(f"the tokenizer in {tokenizer_dir} has tokens the model has no embedding for "
                        f"({', '.join(beyond[:5])}; the model's vocab_size is {n_vocab})",
                        "resize the model's embeddings to the tokenizer (training does not add tokens by itself), "
                        "or export with the tokenizer the base was trained with")
    special = set(tokenizer.all_special_ids)
    added = {i for i, t in tokenizer.added_tokens_decoder.items() if not t.special}
    tokens, types = [], []
    for i in range(n_vocab):  # the model's embedding may be larger than the vocabulary
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # The library's reader of tokenizer.json merges (it encodes spaces inside merges the way
    # llama.cpp expects); its special-token guesses are not used, so its warnings about them are muted.
    logging.getLogger("gguf").setLevel(logging.ERROR)
    merges = gguf.SpecialVocab(tokenizer_dir, load_merges=True, special_token_types=()).merges
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_add_eos_token(False)  # training never appends EOS to a prompt
    writer.add_chat_template(chat_template)


# --------------------------------------------------------------------------- tensors

def _architecture(config) -> tuple[str, Architecture]:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise LoraError(f"lora export cannot write a {model_type!r} model as GGUF",
                        f"supported architectures: {', '.join(ARCHITECTURES)}; for others, `lora merge` and "
                        "llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise LoraError(f"lora export does not write rope scaling ({rope.get('rope_type', rope.get('type'))})",
                        "use llama.cpp's convert_hf_to_gguf.py on a `lora merge` output")
    return model_type, ARCHITECTURES[model_type]


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hyperparameters(writer, config) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def permute_rotary_rows(weights, n_head: int):
    """HF orders each head's query/key rows as (first halves, second halves) for rotate_half;
    llama.cpp's LLAMA rope rotates adjacent pairs, so row i of half 0 and row i of half 1 must
    sit side by side. Works on weights (rows, cols), LoRA B (rows, r) and biases (rows,)."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _rotary_heads(hf_name: str, config) -> int | None:
    """Heads of a query/key projection (key: the KV heads), else None."""
    if ".q_proj." in hf_name:
        return config.num_attention_heads
    if ".k_proj." in hf_name:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def gguf_tensor_name(name_map, hf_name: str) -> str:
    found = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise LoraError(f"lora export: no llama.cpp name for tensor {hf_name}",
                        "this model has parts llama.cpp's architecture does not know; report it")
    return found


def _encode(gguf, array, dtype: str):
    """(data, raw_dtype) for one tensor. 1-D tensors (norms, biases) stay float32, as llama.cpp
    expects; q8_0 needs rows in blocks of 32 and falls back to f16 otherwise."""
    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim < 2 or dtype == "f32":
        return array, None
    if dtype == "f16":
        return array.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    try:
        return gguf.quants.quantize(array, qtype), qtype
    except gguf.quants.QuantError:
        return array.astype(np.float16), None


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _new_writer(path: Path, arch_name: str, kind: str, name: str):
    gguf = _gguf()
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_type(kind)
    writer.add_name(name)
    writer.add_string(OWNER_KEY, OWNER_VALUE)
    return writer


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --------------------------------------------------------------------------- the formats

def check_out(out: Path, info, base, force: bool, *, folder: bool = False) -> None:
    """The one output check (lora_cli.files.ownership.check_output), with this command's inputs."""

    base_path = inference_model_config(info, base, quantization="none").name_or_path
    ownership.check_output(out, "export", force=force, folder=folder,
                           inputs=[("adapter", info.path), ("base model", base_path)])


def _merged(adapter_dir, out: Path, dtype: str, force: bool, base, log, *, folder: bool = False):
    """(info, merged float32 model, tokenizer, tokenizer folder): the merge `lora merge` does.
    The dtype, the adapter, the output and the base's architecture are checked first, before
    the slow part."""

    _check_dtype(dtype)
    info = verify_adapter(adapter_dir)
    check_mergeable(info)
    check_out(out, info, base, force, folder=folder)
    _base_config(info, base)
    info, model, model_cfg = merged_model(adapter_dir, base=base, log=log)
    tokenizer_dir = info.path if (info.path / "tokenizer_config.json").is_file() else Path(model_cfg.name_or_path)
    return info, model, load_tokenizer(str(tokenizer_dir)), tokenizer_dir


def write_merged_gguf(path: Path, model, tokenizer, tokenizer_dir: Path, spec, dtype: str, name: str) -> None:
    gguf = _gguf()
    config = model.config
    _, arch = _architecture(config)
    model_arch = getattr(gguf.MODEL_ARCH, arch.gguf_name)
    writer = _new_writer(path, gguf.MODEL_ARCH_NAMES[model_arch], "model", name)
    add_hyperparameters(writer, config)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # No BOS in the template: the file's add_bos_token adds it, as training did.
    add_tokenizer(writer, tokenizer, tokenizer_dir, config.vocab_size, jinja_chat_template(spec, tokenizer))
    name_map = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # llama.cpp computes rope itself; a tied output reuses token_embd
    tensors = {n: t for n, t in model.state_dict().items()
               if not (n.endswith("rotary_emb.inv_freq") or (tied and n == "lm_head.weight"))}
    progress.add_total(len(tensors) + 1)  # each tensor, then the file
    progress.note(f"converting {len(tensors)} tensors to {dtype}")
    for hf_name, tensor in tensors.items():
        array = tensor.detach().float().cpu().numpy()
        heads = _rotary_heads(hf_name, config) if arch.permute_qk else None
        if heads:
            array = permute_rotary_rows(array, heads)
        data, raw_dtype = _encode(gguf, array, dtype)
        writer.add_tensor(gguf_tensor_name(name_map, hf_name), data, raw_dtype=raw_dtype)
        progress.advance()
    with progress.step("writing the GGUF file"):
        _finish(writer)


def export_gguf(adapter_dir, out, *, dtype: str = "f16", force: bool = False, base: str | None = None,
                log=print) -> Path:
    """The adapter merged into its full-precision base, as one GGUF file."""
    out = Path(out)
    info, model, tokenizer, tokenizer_dir = _merged(adapter_dir, out, dtype, force, base, log)
    with ownership.writing_file(out, "export") as tmp:
        write_merged_gguf(tmp, model, tokenizer, tokenizer_dir, info.template, dtype, _display_name(info))
    log(f"GGUF ({dtype}, {_size(out)}) written to {out}")
    return out


def export_ollama(adapter_dir, out, *, dtype: str = "f16", force: bool = False, base: str | None = None,
                  log=print) -> Path:
    """A folder Ollama imports: the merged GGUF and a Modelfile reproducing the training template."""
    out = Path(out)
    info, model, tokenizer, tokenizer_dir = _merged(adapter_dir, out, dtype, force, base, log, folder=True)
    text = modelfile(info.template, tokenizer.eos_token)  # refuses chat_template before writing anything
    with ownership.writing_folder(out, "export", force) as tmp:
        write_merged_gguf(tmp / OLLAMA_GGUF, model, tokenizer, tokenizer_dir, info.template, dtype, _display_name(info))
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
    name = re.sub(r"[^a-z0-9._-]+", "-", out.resolve().name.lower()).strip("-") or "lora-model"
    log(f"Ollama model ({dtype}, {_size(out / OLLAMA_GGUF)}) written to {out}")
    log(f"import it with:  {shlex.join(['ollama', 'create', name, '-f', str(out / 'Modelfile')])}")
    return out


def export_gguf_adapter(adapter_dir, out, *, dtype: str = "f32", force: bool = False, base: str | None = None,
                        log=print) -> Path:
    """The LoRA adapter alone as a GGUF LoRA file (general.type=adapter, adapter.type=lora,
    adapter.lora.alpha; tensors <base tensor>.lora_a / .lora_b), for a GGUF base of the same model."""

    out = Path(out)
    _check_dtype(dtype)
    if dtype == "q8_0":
        raise LoraError("--format gguf-adapter: --dtype q8_0 is not offered for adapters", "use f32, f16 or bf16")
    info = verify_adapter(adapter_dir)
    check_mergeable(info)
    alpha = _plain_lora_alpha(info)
    config = _base_config(info, base)
    check_out(out, info, base, force)
    with ownership.writing_file(out, "export") as tmp:
        write_adapter_gguf(tmp, info, config, alpha, dtype)
    log(f"GGUF LoRA adapter ({dtype}, alpha {alpha:g}, {_size(out)}) written to {out}; "
        "apply it to a GGUF of the same base (llama.cpp: --lora FILE)")
    return out


def _plain_lora_alpha(info) -> float:
    """The alpha llama.cpp needs (it scales B·A by alpha / rank); refuses what it cannot express."""
    cfg = info.config
    if info.peft_type != "LORA":
        raise LoraError(f"--format gguf-adapter: a {info.peft_type} adapter is not a LoRA, and llama.cpp applies only LoRA",
                        "use --format gguf (the adapter merged into the base)")
    blockers = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if cfg.get(k)]
    if blockers:
        raise LoraError(f"--format gguf-adapter: {', '.join(blockers)} in {info.path / 'adapter_config.json'} "
                        "cannot be expressed as a llama.cpp LoRA (one alpha, plain B·A on linear layers)",
                        "use --format gguf (the adapter merged into the base)")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    return alpha * r ** 0.5 if cfg.get("use_rslora") else alpha  # rsLoRA scales by alpha / sqrt(r)


def _base_config(info, base):
    from transformers import AutoConfig

    quiet_libraries()
    name = inference_model_config(info, base, quantization="none").name_or_path
    try:
        # llama.cpp runs only architectures it knows, so export never needs a model's own code
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as e:
        refuse_remote_code(name, "the base model", "llama.cpp reads only the architectures it knows, and lora export "
                           "runs no code shipped with a model; merge with `lora merge --trust-remote-code` instead")
        raise LoraError(f"cannot read the base model's config.json at {name!r}: {str(e).splitlines()[0]}",
                        "pass --base MODEL_FOLDER") from None
    _architecture(config)
    return config


def write_adapter_gguf(path: Path, info, config, alpha: float, dtype: str) -> None:
    import numpy as np
    from safetensors.numpy import load_file

    gguf = _gguf()
    _, arch = _architecture(config)
    model_arch = getattr(gguf.MODEL_ARCH, arch.gguf_name)
    writer = _new_writer(path, gguf.MODEL_ARCH_NAMES[model_arch], "adapter", _display_name(info))
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    name_map = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    weights = info.path / "adapter_model.safetensors"
    if not weights.is_file():
        raise LoraError(f"{info.path}: no adapter_model.safetensors", "export the adapter with `lora save` first")
    tensors = sorted(load_file(str(weights)).items())
    progress.add_total(len(tensors) + 1)  # each tensor, then the file
    progress.note(f"converting {len(tensors)} LoRA tensors to {dtype}")
    for peft_name, array in tensors:
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", peft_name)
        if not match:
            raise LoraError(f"--format gguf-adapter: tensor {peft_name} is not a LoRA A/B matrix",
                            "use --format gguf (the adapter merged into the base)")
        hf_name, which = match.group(1), match.group(2)
        array = array.astype(np.float32)
        heads = _rotary_heads(hf_name + ".", config) if arch.permute_qk else None
        if heads and which == "B":  # B's rows are the projection's output rows
            array = permute_rotary_rows(array, heads)
        data, raw_dtype = _encode(gguf, array, dtype)
        writer.add_tensor(f"{gguf_tensor_name(name_map, hf_name + '.weight')}.lora_{which.lower()}", data,
                          raw_dtype=raw_dtype)
        progress.advance()
    with progress.step("writing the GGUF file"):
        _finish(writer)


class Exporter(NamedTuple):
    write: Callable  # (adapter_dir, out, *, force, base, log, [dtype]) -> the path written
    doc: str         # what --format's help says of it


EXPORTERS = {"gguf": Exporter(export_gguf, "merged model"),
             "gguf-adapter": Exporter(export_gguf_adapter, "the LoRA alone"),
             "ollama": Exporter(export_ollama, "folder: GGUF + Modelfile")}
FORMATS = tuple(EXPORTERS)  # what --format takes


def export(adapter_dir, out, *, format: str, dtype: str | None = None, force: bool = False,
           base: str | None = None, log=print) -> Path:
    if format not in EXPORTERS:
        raise LoraError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    kwargs = {"dtype": dtype} if dtype else {}
    return EXPORTERS[format].write(adapter_dir, out, force=force, base=base, log=log, **kwargs)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise LoraError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def _display_name(info) -> str:
    return Path(info.path).resolve().name


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"
