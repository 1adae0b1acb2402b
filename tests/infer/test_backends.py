"""The inference backend seam (backends.py): prompt ids + adapter + settings in, tokens and
streamed text out, per-row stop strings, lengths and cancellation inside one batch."""

from __future__ import annotations

import pytest
from inference_helpers import two_random_adapters

from lora_cli.errors import LoraError

PROMPTS = ["What is LoRA?", "Explain the rank of an adapter in one sentence.", "hi"]


@pytest.fixture(scope="module")
def loaded(tiny_random, tmp_path_factory):
    from lora_cli.infer.engines import TransformersBackend

    one, two = two_random_adapters(tiny_random, tmp_path_factory.mktemp("backend-adapters"), seeds=(31, 32))
    backend, infos = TransformersBackend.load({"one": one, "two": two})
    return backend, infos


def _ids(backend, infos, text, adapter="one"):
    from lora_cli.infer.generate import build_prompt_ids

    return build_prompt_ids(backend.tokenizer, infos["one" if adapter is None else adapter].template, text)


def _request(backend, infos, text, adapter="one", max_new_tokens=12, **kwargs):
    from lora_cli.infer.engines import GenerationRequest
    from lora_cli.infer.settings import GenerationSettings

    return GenerationRequest(_ids(backend, infos, text, adapter), GenerationSettings(max_new_tokens=max_new_tokens),
                             adapter, **kwargs)


def _alone(backend, request):
    """The request answered on its own, through the legacy one-model path (infer.generate_batch)."""
    from lora_cli.infer.engines import using_variant
    from lora_cli.infer.generate import generate_batch

    with using_variant(backend.model, request.adapter):
        return generate_batch(backend.model, backend.tokenizer, [request.prompt_ids], request.settings)[0]


def test_mixed_adapters_and_lengths_in_one_call_equal_each_alone(loaded):
    backend, infos = loaded
    requests = [_request(backend, infos, p, adapter, max_new_tokens=n)
                for p, adapter, n in [(PROMPTS[0], "one", 12), (PROMPTS[1], "two", 5), (PROMPTS[2], None, 9),
                                      (PROMPTS[2], "one", 3)]]
    completions = backend.generate(requests)
    assert [c.text for c in completions] == [_alone(backend, r) for r in requests]
    assert len({c.text for c in completions[:3]}) == 3  # three variants really answered
    for c, r in zip(completions, requests):
        assert c.prompt_tokens == len(r.prompt_ids)
        assert len(c.token_ids) <= r.settings.max_new_tokens
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "length":
            assert len(c.token_ids) == r.settings.max_new_tokens


def test_streamed_text_equals_the_answer_and_stop_strings_cut_it(loaded):
    backend, infos = loaded
    plain = backend.generate([_request(backend, infos, PROMPTS[0], max_new_tokens=16)])[0]
    pieces: list[str] = []
    streamed = backend.generate([_request(backend, infos, PROMPTS[0], max_new_tokens=16, on_text=pieces.append)])[0]
    assert streamed.text == plain.text and "".join(pieces) == plain.text and len(pieces) > 1

    stop = plain.text[len(plain.text) // 2:][:3]  # a piece from the middle of the answer
    assert stop.strip(), plain.text
    pieces = []
    cut = backend.generate([_request(backend, infos, PROMPTS[0], max_new_tokens=16, stop=(stop,),
                                     on_text=pieces.append)])[0]
    assert cut.text == plain.text[:plain.text.find(stop)].strip()
    assert cut.finish_reason == "stop" and len(cut.token_ids) < len(plain.token_ids)
    assert "".join(pieces) == cut.text


def test_cancel_stops_one_row_and_not_its_batch(loaded):
    backend, infos = loaded
    victim = _request(backend, infos, PROMPTS[0], max_new_tokens=40)
    victim.on_text = lambda _: victim.cancel.set()  # the client goes away after its first words
    other = _request(backend, infos, PROMPTS[1], max_new_tokens=12)
    cancelled, answered = backend.generate([victim, other])
    assert cancelled.finish_reason == "cancelled" and len(cancelled.token_ids) < 40
    assert answered.text == _alone(backend, other)


def test_registry_names_the_engines():
    from lora_cli.infer.engines import BACKENDS, TransformersBackend, backend_class

    assert backend_class("transformers") is TransformersBackend
    assert all(getattr(cls, "name") == name for name, cls in BACKENDS.items())
    with pytest.raises(LoraError, match="--engine 'nope'"):
        backend_class("nope")
