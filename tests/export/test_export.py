"""`lora export`, checked by llama.cpp itself (llama-cpp-python): the tokenizer gives the ids
transformers gives, the logits match the merged model, greedy answers equal `lora generate`'s,
the embedded chat template renders the training text, and the GGUF LoRA adapter applied to a
GGUF base answers like the merged model. A tiny Llama and a tiny Qwen2 (Qwen2's own
pre-tokenizer split rule, no BOS) are exported; every adapter has B far from zero."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import yaml
from conftest import demo_rows, train_learned_adapter
from inference_helpers import random_adapter

PROMPTS = ["什么是LoRA？", "用一句话解释什么是微调。", "What is LoRA?", "Explain  fine-tuning,\nbriefly: 3 steps!",
           "混合 mixed 文本 with numbers 12345 和标点。", "  leading spaces and trailing  "]
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]  # q and k: the rotary row order matters
# f32 GGUF vs the float32 torch model: the same weights, summed in another order.
F32_ATOL = 1e-4
# f16 weights: relative rounding 2**-11 per weight; measured 7e-3 (Llama), 6e-4 (Qwen2) here.
F16_ATOL = 2e-2
GREEDY_TOKENS = 12
PAD = "<|endoftext|>"
GGML_F32 = 0  # ggml_type of float32
Q8_PROMPTS = 6  # demo rows the trained adapter learns; q8_0 must answer each like f32


# --------------------------------------------------------------------------- models and exports

@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A tiny Qwen2 (biases on q/k/v, tied embeddings, no BOS) with a byte-level BPE trained like
    lora_cli.tiny.decoder's but split by Qwen2's own regex, lightly pre-trained so its logits are not flat."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from lora_cli.tiny.decoder import BOS, EOS, UNK, corpus_from_rows, pretrain

    torch.manual_seed(0)
    texts = corpus_from_rows(demo_rows())
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts + ["Human: \n\nAssistant: "], trainer=trainers.BpeTrainer(
        vocab_size=1024, special_tokens=[UNK, BOS, EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    # Qwen2's tokenizer class pads with <|endoftext|>, so the vocabulary has it (as Qwen2's does).
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                        pad_token=PAD)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, rms_norm_eps=1e-6)
    model = Qwen2ForCausalLM(config)
    pretrain(model, tokenizer, texts, steps=40, seed=0, block=64, batch=8)
    out = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _adapter(base: Path, out: Path, seed: int, template: dict | None = None, scale: float = 0.1) -> Path:
    path = random_adapter(base, out, seed=seed, target_modules=TARGETS, scale=scale)
    recipe = {"model": {"name_or_path": str(base)}, "data": template or {"template": "human_assistant"}}
    (path / "lora_recipe.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def llama_adapter(tiny_base, tmp_path_factory) -> Path:
    return _adapter(tiny_base, tmp_path_factory.mktemp("adapters") / "llama", seed=7)


@pytest.fixture(scope="module")
def qwen2_adapter(tiny_qwen2, tmp_path_factory) -> Path:
    return _adapter(tiny_qwen2, tmp_path_factory.mktemp("adapters") / "qwen2", seed=8)


@pytest.fixture(scope="module")
def trained_adapter(tiny_base, tmp_path_factory) -> Path:
    """An adapter `lora train` really trained on a few demo rows: its answers are learned, not
    the near ties of random weights, as a user's adapter is."""
    return train_learned_adapter(tiny_base, tmp_path_factory.mktemp("trained"), demo_rows(Q8_PROMPTS))


@pytest.fixture(scope="module")
def exports(llama_adapter, qwen2_adapter, trained_adapter, tmp_path_factory):
    """Export on first use, once per (model, format, dtype)."""
    from lora_cli.export.gguf import export

    root = tmp_path_factory.mktemp("exports")
    adapters = {"llama": llama_adapter, "qwen2": qwen2_adapter, "trained": trained_adapter}
    done: dict[tuple, Path] = {}

    def get(model: str, dtype: str = "f32", format: str = "gguf") -> Path:
        key = (model, dtype, format)
        if key not in done:
            done[key] = export(adapters[model], root / f"{model}-{format}-{dtype}.gguf", format=format,
                               dtype=dtype, log=lambda *_: None)
        return done[key]

    return get


@pytest.fixture(scope="module")
def references(llama_adapter, qwen2_adapter):
    """(peft model with the adapter unmerged, tokenizer) per model: what `lora generate` runs."""
    from lora_cli.model.load import load_for_inference

    loaded = {}

    def get(model: str):
        if model not in loaded:
            adapter = {"llama": llama_adapter, "qwen2": qwen2_adapter}[model]
            peft_model, tokenizer, _ = load_for_inference({"default": adapter}, device="cpu")
            loaded[model] = (peft_model, tokenizer)
        return loaded[model]

    return get


def _llama(path: Path, **kwargs):
    from llama_cpp import Llama

    # n_ubatch=1: on a CPU with AMX, llama.cpp repacks q8_0 weights for its AMX kernels, and
    # those segfaulted in decode on multi-token batches of these tiny models (see GGUFCandidate).
    return Llama(model_path=str(path), n_ctx=256, n_ubatch=1, n_threads=2, verbose=False, seed=0, **kwargs)


def _greedy(llm, ids: list[int], n: int) -> list[int]:
    """llama.cpp's own greedy loop: argmax of its logits, stopping at its end-of-generation token."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if llm.token_eos() == token:
            break
        out.append(token)
        llm.eval([token])
    return out


def _hf_greedy(model, tokenizer, ids: list[int], n: int) -> list[int]:
    """The ids `lora generate` produces (its own generation settings, greedy)."""
    import torch

    from lora_cli.infer.settings import GenerationSettings

    kwargs = GenerationSettings(max_new_tokens=n).to_kwargs(tokenizer)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             **kwargs)[0, len(ids):].tolist()
    return out[:-1] if out and out[-1] == tokenizer.eos_token_id else out


def _embedded_template_prompt(llm, messages) -> str:
    """Render the file's chat template the way llama-cpp-python's chat handler does."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    meta = llm.metadata
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    bos = llm.detokenize([llm.token_bos()], special=True).decode()
    formatter = Jinja2ChatFormatter(template=meta["tokenizer.chat_template"], eos_token=eos, bos_token=bos,
                                    add_generation_prompt=True)
    return formatter(messages=messages).prompt


# --------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_llama_cpp_tokenizes_like_transformers(exports, references, model):
    import gguf

    path = exports(model)
    _, tokenizer = references(model)
    llm = _llama(path, vocab_only=True)
    for text in PROMPTS:
        assert llm.tokenize(text.encode(), add_bos=llm.metadata["tokenizer.ggml.add_bos_token"] == "true",
                            special=True) == tokenizer(text)["input_ids"], text
        assert llm.detokenize(tokenizer(text, add_special_tokens=False)["input_ids"]).decode() == text
    reader = gguf.GGUFReader(str(path))
    assert reader.get_field("tokenizer.ggml.pre").contents() == {"llama": "gpt-2", "qwen2": "qwen2"}[model]
    assert reader.get_field("tokenizer.ggml.add_bos_token").contents() is (model == "llama")
    for kind in ("bos", "eos", "padding"):
        field = reader.get_field(f"tokenizer.ggml.{kind}_token_id")
        want = getattr(tokenizer, f"{'pad' if kind == 'padding' else kind}_token_id")
        assert field.contents() == want
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    assert {types[i] for i in tokenizer.all_special_ids} == {gguf.TokenType.CONTROL}


# --------------------------------------------------------------------------- logits

@pytest.mark.parametrize("model,dtype,atol", [("llama", "f32", F32_ATOL), ("llama", "f16", F16_ATOL),
                                              ("qwen2", "f32", F32_ATOL), ("qwen2", "f16", F16_ATOL)])
def test_logits_match_the_merged_model(exports, references, model, dtype, atol):
    import numpy as np
    import torch

    from lora_cli.infer.generate import build_prompt_ids

    peft_model, tokenizer = references(model)
    ids = build_prompt_ids(tokenizer, "human_assistant", PROMPTS[0])[:16]
    with torch.no_grad():
        reference = peft_model(input_ids=torch.tensor([ids])).logits[0].numpy()
        with peft_model.disable_adapter():
            base = peft_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(reference - base).max() > 0.5  # the adapter matters: a base-only export would fail here
    # An f32 KV cache: llama.cpp's default f16 cache alone moves logits by ~1e-2.
    llm = _llama(exports(model, dtype), logits_all=True, type_k=GGML_F32, type_v=GGML_F32)
    llm.reset()
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    diff = np.abs(got - reference).max()
    print(f"{model} {dtype}: max |llama.cpp - transformers| logit difference {diff:.2e} (tolerance {atol})")
    assert diff < atol


# --------------------------------------------------------------------------- generation and template

@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_greedy_answer_equals_lora_generate(exports, references, llama_adapter, qwen2_adapter, cli, model):
    from lora_cli.infer.generate import build_prompt_ids

    peft_model, tokenizer = references(model)
    llm = _llama(exports(model), logits_all=True)
    adapter = {"llama": llama_adapter, "qwen2": qwen2_adapter}[model]
    for prompt in PROMPTS[:3]:
        text = _embedded_template_prompt(llm, [{"role": "user", "content": prompt}])
        ids = llm.tokenize(text.encode(), add_bos=bool(llm.metadata["tokenizer.ggml.add_bos_token"] == "true"),
                           special=True)
        assert ids == build_prompt_ids(tokenizer, "human_assistant", prompt)  # the ids training built
        tokens = _greedy(llm, ids, GREEDY_TOKENS)
        assert tokens == _hf_greedy(peft_model, tokenizer, ids, GREEDY_TOKENS), prompt
        res = cli("generate", "--adapter", adapter, prompt, "--max-new-tokens", GREEDY_TOKENS)
        assert res.code == 0, res
        assert res.out.strip() == tokenizer.decode(tokens, skip_special_tokens=True).strip()


CONVERSATIONS = [
    [{"role": "user", "content": "什么是LoRA？"}],
    [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "What is LoRA? "}],
    [{"role": "user", "content": "Translate", "input": "你好"}, {"role": "assistant", "content": "Hello"},
     {"role": "user", "content": "再来一个 {input}"}],
]
SPECS = [{"template": "human_assistant"}, {"template": "alpaca"},
         {"template": "human_assistant", "system_prompt": "Answer in 'one' line.\\n"},
         {"template": "custom", "prompt_format": "<|user|>\n{instruction}\n{input}\n<|assistant|>\n",
          "system_format": "<|system|>\n{system}\n", "turn_separator": "\n"}]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["template"] + ("+system" if "system_prompt" in s else ""))
def test_embedded_chat_template_renders_the_training_text(tiny_random, tmp_path, spec):
    """llama-cpp-python's Jinja renderer on the file's template gives the text of the segments
    training built (EOS where training put the EOS id), for every text template."""
    from lora_cli.export.gguf import export
    from lora_cli.data.template import TemplateSpec, conversation_segments

    adapter = _adapter(tiny_random, tmp_path / "adapter", seed=3, template=spec)
    path = export(adapter, tmp_path / "m.gguf", format="gguf", dtype="f16", log=lambda *_: None)
    llm = _llama(path, vocab_only=True)
    template = TemplateSpec.from_data(spec)
    for messages in CONVERSATIONS:
        want = "".join(s.text + ("</s>" if s.eos else "")
                       for s in conversation_segments(template, messages, add_generation_prompt=True))
        assert _embedded_template_prompt(llm, messages) == want


def test_chat_template_adapter_keeps_the_tokenizers_template(tiny_random, tmp_path):
    import gguf

    from lora_cli.export.gguf import export
    from lora_cli.tiny.decoder import CHAT_TEMPLATE

    adapter = _adapter(tiny_random, tmp_path / "adapter", seed=4, template={"template": "chat_template"})
    path = export(adapter, tmp_path / "m.gguf", format="gguf", dtype="f16", log=lambda *_: None)
    assert gguf.GGUFReader(str(path)).get_field("tokenizer.chat_template").contents() == CHAT_TEMPLATE


# --------------------------------------------------------------------------- q8_0 and the adapter file

def test_q8_0_answers_the_demo_prompts_like_f32_and_is_smaller(exports, tiny_base, capsys):
    """A trained adapter, exported f32 and q8_0: llama.cpp's greedy answers to the demo prompts
    it learned (rendered by its training template) are the same tokens in both files."""
    from lora_cli.infer.generate import build_prompt_ids
    from lora_cli.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_base))
    f32, q8 = _llama(exports("trained", "f32"), logits_all=True), _llama(exports("trained", "q8_0"), logits_all=True)
    for row in demo_rows(Q8_PROMPTS):
        ids = build_prompt_ids(tokenizer, "human_assistant", row["instruction"], input=row.get("input", ""))
        want = _greedy(f32, ids, GREEDY_TOKENS)
        assert len(want) >= 4, row  # a learned answer, not an immediate end
        assert _greedy(q8, ids, GREEDY_TOKENS) == want, row["instruction"]
    sizes = {d: exports("trained", d).stat().st_size for d in ("f32", "f16", "q8_0")}
    with capsys.disabled():
        print(f"\ntiny Llama GGUF sizes (bytes): {sizes}")
    assert sizes["q8_0"] < 0.6 * sizes["f16"] < 0.6 * sizes["f32"]


def test_gguf_lora_adapter_on_gguf_base_answers_like_the_merged_model(tiny_base, llama_adapter, exports,
                                                                      references, tmp_path, cli):
    """A GGUF base (an adapter with B = 0 merged: the base's own weights) plus the exported GGUF
    LoRA, applied by llama.cpp, gives the merged model's greedy tokens."""
    import gguf
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_cli.infer.generate import build_prompt_ids

    identity = tmp_path / "identity"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
                   LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(identity)
    res = cli("export", "--adapter", identity, "--format", "gguf", "--dtype", "f32", "--out", tmp_path / "base.gguf")
    assert res.code == 0, res
    res = cli("export", "--adapter", llama_adapter, "--format", "gguf-adapter", "--out", tmp_path / "lora.gguf")
    assert res.code == 0, res
    reader = gguf.GGUFReader(str(tmp_path / "lora.gguf"))
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    assert reader.get_field("adapter.lora.alpha").contents() == 8.0
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.1.ffn_down.weight.lora_b" in names

    peft_model, tokenizer = references("llama")
    plain = _llama(tmp_path / "base.gguf", logits_all=True)
    adapted = _llama(tmp_path / "base.gguf", logits_all=True, lora_path=str(tmp_path / "lora.gguf"))
    merged = _llama(exports("llama", "f32"), logits_all=True)
    for prompt in PROMPTS[:3]:
        ids = build_prompt_ids(tokenizer, "human_assistant", prompt)
        want = _hf_greedy(peft_model, tokenizer, ids, GREEDY_TOKENS)
        assert _greedy(adapted, ids, GREEDY_TOKENS) == want == _greedy(merged, ids, GREEDY_TOKENS), prompt
    with peft_model.disable_adapter():
        base_tokens = _hf_greedy(peft_model, tokenizer, ids, GREEDY_TOKENS)
    assert _greedy(plain, ids, GREEDY_TOKENS) == base_tokens != want  # the adapter changes the answer


# --------------------------------------------------------------------------- ollama

def test_ollama_folder_has_gguf_and_modelfile_reproducing_the_template(tiny_random, tmp_path, cli):
    adapter = _adapter(tiny_random, tmp_path / "adapter", seed=5,
                       template={"template": "alpaca", "system_prompt": "Be brief."})
    out = tmp_path / "ollama"
    res = cli("export", "--adapter", adapter, "--format", "ollama", "--out", out)
    assert res.code == 0, res
    assert f"ollama create ollama -f {out / 'Modelfile'}" in res.out
    assert {p.name for p in out.iterdir()} == {"Modelfile", "model.gguf", ".lora-owner.json"}
    text = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in text and 'SYSTEM """Be brief."""\n' in text and 'PARAMETER stop "</s>"\n' in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    # The Go template's literal pieces are the alpaca template's own strings, in training order.
    from lora_cli.data.template import TemplateSpec

    tpl = TemplateSpec(name="alpaca").text_template()
    before, after = tpl.without_input.split("{instruction}")
    for piece in (before, after, tpl.turn_separator):
        assert json.dumps(piece, ensure_ascii=False) in template
    user_turn = template.index(json.dumps(before))
    assert template.index(json.dumps(after), template.index("{{ $m.Content }}", user_turn)) > user_turn
    llm = _llama(out / "model.gguf", vocab_only=True)
    assert llm.metadata["general.type"] == "model"


def test_ollama_refuses_a_jinja_trained_adapter(tiny_random, tmp_path, cli):
    adapter = _adapter(tiny_random, tmp_path / "adapter", seed=6, template={"template": "chat_template"})
    res = cli("export", "--adapter", adapter, "--format", "ollama", "--out", tmp_path / "o")
    assert res.code == 2 and "Go templates" in res.err and not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".*"))  # no staging sibling left


# --------------------------------------------------------------------------- bad input

def test_unsupported_architecture_is_refused_naming_the_supported(tmp_path, cli, tiny_random):
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2"
    tokenizer = AutoTokenizer.from_pretrained(tiny_random)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    from peft import LoraConfig, get_peft_model

    get_peft_model(GPT2LMHeadModel.from_pretrained(base, dtype=torch.float32),
                   LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM")).save_pretrained(tmp_path / "a")
    for fmt in ("gguf", "gguf-adapter"):
        res = cli("export", "--adapter", tmp_path / "a", "--format", fmt, "--out", tmp_path / "x.gguf")
        assert res.code == 2 and "'gpt2'" in res.err and "llama, qwen2" in res.err, res
    assert not list(tmp_path.glob("x.gguf*")) and not list(tmp_path.glob(".*"))


def test_prompt_tuning_adapter_is_refused(tiny_random, tmp_path, cli):
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_random, dtype=torch.float32),
                   PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")).save_pretrained(tmp_path / "pt")
    for fmt in ("gguf", "gguf-adapter", "ollama"):
        res = cli("export", "--adapter", tmp_path / "pt", "--format", fmt, "--out", tmp_path / "x")
        assert res.code == 2 and "virtual tokens" in res.err, res
    assert [p.name for p in tmp_path.iterdir()] == ["pt"]


def test_existing_out_needs_force_and_force_replaces_only_our_own_file(tiny_random, tmp_path, cli):
    adapter = random_adapter(tiny_random, tmp_path / "adapter", seed=9)
    out = tmp_path / "m.gguf"
    out.write_text("a user's file")
    res = cli("export", "--adapter", adapter, "--format", "gguf", "--out", out)
    assert res.code == 2 and "already exists" in res.err
    res = cli("export", "--adapter", adapter, "--format", "gguf", "--out", out, "--force")
    assert res.code == 2 and "not written by `lora export`" in res.err
    assert out.read_text() == "a user's file"
    out.unlink()
    assert cli("export", "--adapter", adapter, "--format", "gguf", "--out", out).code == 0
    first = out.stat().st_mtime_ns
    res = cli("export", "--adapter", adapter, "--format", "gguf", "--dtype", "q8_0", "--out", out, "--force")
    assert res.code == 0, res
    assert out.stat().st_mtime_ns != first and "q8_0" in res.out
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    res = cli("export", "--adapter", adapter, "--format", "ollama", "--out", folder, "--force")
    assert res.code == 2 and (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lora-owner.json", "adapter", "folder", "m.gguf"]


def test_full_disk_leaves_nothing_and_keeps_the_old_file(tiny_random, tmp_path, cli, monkeypatch):
    import gguf

    adapter = random_adapter(tiny_random, tmp_path / "adapter", seed=10)
    out = tmp_path / "m.gguf"
    assert cli("export", "--adapter", adapter, "--format", "gguf", "--out", out).code == 0
    before = out.read_bytes()

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    for fmt, target in (("gguf", out), ("gguf-adapter", tmp_path / "a.gguf"), ("ollama", tmp_path / "ollama")):
        res = cli("export", "--adapter", adapter, "--format", fmt, "--out", target, "--force")
        assert res.code == 2 and "no space left" in res.err.lower() and str(target) in res.err, res
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lora-owner.json", "adapter", "m.gguf"]


def test_bad_format_and_dtype(tiny_random, tmp_path, cli):
    adapter = random_adapter(tiny_random, tmp_path / "adapter", seed=11)
    res = cli("export", "--adapter", adapter, "--format", "onnx", "--out", tmp_path / "x")
    assert res.code == 2 and "--format" in res.err and all(f"'{c}'" in res.err for c in ("gguf", "gguf-adapter", "ollama"))
    res = cli("export", "--adapter", adapter, "--format", "gguf", "--dtype", "q4_0", "--out", tmp_path / "x")
    assert res.code == 2 and "f32, f16, bf16, q8_0" in res.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]



def test_adapter_trained_on_4bit_base_is_merged_into_the_full_precision_base(tiny_random, tmp_path, cli):
    """The recipe says 4bit: export reloads the base unquantized (as `lora merge` does), so the
    file equals the export of the same adapter marked as trained in full precision."""
    import gguf
    import numpy as np

    adapter = random_adapter(tiny_random, tmp_path / "adapter", seed=12)
    recipe = {"model": {"name_or_path": str(tiny_random), "quantization": "4bit"}, "data": {"template": "human_assistant"}}
    (adapter / "lora_recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    res = cli("export", "--adapter", adapter, "--format", "gguf", "--dtype", "f32", "--out", tmp_path / "q.gguf")
    assert res.code == 0, res
    assert "4bit base" in res.out and "full precision" in res.out
    recipe["model"]["quantization"] = "none"
    (adapter / "lora_recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    assert cli("export", "--adapter", adapter, "--format", "gguf", "--dtype", "f32", "--out", tmp_path / "f.gguf").code == 0
    a, b = (gguf.GGUFReader(str(tmp_path / n)).tensors for n in ("q.gguf", "f.gguf"))
    assert [t.name for t in a] == [t.name for t in b]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a, b))
