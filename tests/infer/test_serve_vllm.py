"""`lora serve --engine vllm` on CPU: the vLLM command line, the chat template it writes (rendered
here with the tokenizer, as vLLM renders it, and compared with the training template's
prompt), and the exit 2 that says what this machine lacks."""

from __future__ import annotations

import shlex

import pytest
import yaml
from inference_helpers import random_adapter, two_random_adapters

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is LoRA?"},
                {"role": "assistant", "content": "A low-rank update."}, {"role": "user", "content": "  And {input} QLoRA? "}]


@pytest.fixture(scope="module")
def adapters(tiny_random, tmp_path_factory):
    return two_random_adapters(tiny_random, tmp_path_factory.mktemp("vllm-adapters"), seeds=(51, 52))


def test_command_serves_base_and_every_adapter_with_the_training_template(adapters, tiny_random, tmp_path):
    from lora_cli.infer.vllm import prepare_vllm

    one, two = adapters
    argv = prepare_vllm({"one": one, "two": two}, base=None, host="127.0.0.1", port=8001, api_key="k", work_dir=tmp_path)
    assert argv[:3] == ["vllm", "serve", str(tiny_random)]
    flags = shlex.join(argv)
    assert "--host 127.0.0.1 --port 8001 --served-model-name base" in flags
    assert f"--enable-lora --max-loras 2 --max-lora-rank 8 --lora-modules one={one} two={two}" in flags  # r=4 -> 8
    assert argv[argv.index("--api-key") + 1] == "k"
    template_file = argv[argv.index("--chat-template") + 1]
    assert template_file.startswith(str(tmp_path)) and "Human: " in open(template_file, encoding="utf-8").read()


@pytest.mark.parametrize("data", [
    {"template": "human_assistant"},
    {"template": "alpaca"},
    {"template": "custom", "prompt_format": "<|user|>\n{instruction}\n{input}\n<|assistant|>\n",
     "system_format": "<|system|>\n{system}\n", "turn_separator": "\n", "system_prompt": "You are terse."},
])
def test_chat_template_renders_what_training_rendered(tiny_random, data):
    from lora_cli.model.load import load_tokenizer
    from lora_cli.data.template import TemplateSpec, jinja_chat_template, prompt_ids

    tok = load_tokenizer(str(tiny_random))
    spec = TemplateSpec.from_data(data)
    jinja = jinja_chat_template(spec, tok, bos=True)  # what prepare_vllm writes
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[3:]):
        ids = prompt_ids(tok, spec, [dict(m) for m in messages])
        rendered = tok.apply_chat_template(messages, chat_template=jinja, tokenize=False, add_generation_prompt=True)
        assert rendered == tok.decode(ids), data["template"]


def test_vllm_needs_one_template_and_a_rank_it_accepts(adapters, tmp_path):
    from lora_cli.errors import LoraError
    from lora_cli.model.adapter_folder import read_adapter
    from lora_cli.infer.vllm import max_lora_rank, one_template, prepare_vllm

    one, _ = adapters
    alpaca = random_adapter(read_adapter(one).base, tmp_path / "alp",
                            seed=3, template="alpaca")
    with pytest.raises(LoraError, match="serves one chat template.*one -> human_assistant, alp -> alpaca"):
        prepare_vllm({"one": one, "alp": alpaca}, base=None, host="127.0.0.1", port=1, api_key=None, work_dir=tmp_path / "w")
    assert one_template({"alp": read_adapter(alpaca)}).name == "alpaca"
    big = read_adapter(one)
    big.config["r"] = 48
    assert max_lora_rank({"a": big}) == 64
    big.config["r"] = 1024
    with pytest.raises(LoraError, match="above vLLM's largest"):
        max_lora_rank({"a": big})


def test_without_vllm_the_command_exits_2_saying_what_is_missing(adapters, cli):
    pytest.importorskip("torch")
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: this test is for machines without it")
    res = cli("serve", "-a", f"one={adapters[0]}", "--engine", "vllm", "--api-key", "secret")
    assert res.code == 2
    assert "--engine vllm cannot start here: vLLM is not installed" in res.err
    assert "vllm serve" in res.err and "--lora-modules" in res.err
    assert "secret" not in res.err  # the key is not printed


def test_recipe_template_is_read_from_the_adapter(tiny_random, tmp_path):
    from lora_cli.infer.vllm import prepare_vllm

    adapter = random_adapter(tiny_random, tmp_path / "a", seed=5, template="alpaca")
    recipe = yaml.safe_load((adapter / "lora_recipe.yaml").read_text(encoding="utf-8"))
    assert recipe["data"]["template"] == "alpaca"
    argv = prepare_vllm({"a": adapter}, base=None, host="0.0.0.0", port=9, api_key=None, work_dir=tmp_path / "w")
    assert "### Instruction" in open(argv[argv.index("--chat-template") + 1], encoding="utf-8").read()
    assert "--api-key" not in argv
