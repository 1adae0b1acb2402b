"""`lora build-tiny --arch bert|t5|bart`: small BERT-, T5- and BART-shaped bases, built offline.

The sibling of tiny.py (the Llama base) for the other model kinds `model.task` trains:
an encoder (BERT) for classification, encoder-decoders (T5, BART) for seq2seq. Same
tokenizer recipe (tiny.train_tokenizer: byte-level BPE trained on the bundled text, BOS in
front of every text), plus a real pad token, which encoder models expect.

BERT is left random: a classification head learns a separable set on top of LoRA'd
attention without pre-training. An encoder-decoder is pre-trained briefly (`steps`), for the
same reason tiny.py pre-trains its Llama: a random base cannot be taught to write answers
through LoRA alone. Its pre-training is plain text to text, never the recipe's prompt
template: for each document "question\\nanswer" the base learns to copy the document, and to
write the whole document from its question. So it knows the facts and the language, and
echoes its input; answering a templated question with the answer alone, then stopping, is
what the adapter has to learn.
"""

from __future__ import annotations

from pathlib import Path

from lora_cli.tiny.decoder import check_build_folder, optimize, save_tiny, train_tokenizer
from lora_cli.data.sources import read_rows
from lora_cli.libraries import quiet_libraries

ARCHS = ("llama", "bert", "t5", "bart")
PAD = "<pad>"


def texts_of_rows(rows: list[dict]) -> list[str]:
    """One document per row, whatever its shape: alpaca, source/target, or text(/text_pair)."""
    docs = []
    for r in rows:
        parts = [r.get(k) for k in ("instruction", "input", "output", "source", "target", "text", "text_pair")]
        docs.append("\n".join(p for p in parts if isinstance(p, str) and p))
    return docs


def tokenizer_with_pad(texts: list[str], vocab_size: int):
    tok = train_tokenizer(texts, vocab_size)
    tok.add_special_tokens({"pad_token": PAD})
    return tok


def model_for(arch: str, tokenizer, *, hidden: int, layers: int, heads: int):
    """A random model of `arch` shaped around the tokenizer."""
    from transformers import (BartConfig, BartForConditionalGeneration, BertConfig, BertModel, T5Config,
                              T5ForConditionalGeneration)

    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    vocab = len(tokenizer)
    if arch == "bert":
        return BertModel(BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                    num_attention_heads=heads, intermediate_size=hidden * 2,
                                    max_position_embeddings=512, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0, **ids))  # tiny and short runs: no dropout
    if arch == "t5":
        return T5ForConditionalGeneration(T5Config(
            vocab_size=vocab, d_model=hidden, d_kv=hidden // heads, d_ff=hidden * 2, num_layers=layers,
            num_heads=heads, feed_forward_proj="relu", decoder_start_token_id=tokenizer.pad_token_id, **ids))
    if arch == "bart":
        return BartForConditionalGeneration(BartConfig(
            vocab_size=vocab, d_model=hidden, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=hidden * 2,
            decoder_ffn_dim=hidden * 2, max_position_embeddings=512, decoder_start_token_id=tokenizer.eos_token_id,
            forced_eos_token_id=None, forced_bos_token_id=None, **ids))
    raise ValueError(f"unknown arch {arch!r}")


def build_tiny_encoder_model(out: str | Path, data: str | Path, arch: str, *, hidden: int = 64, layers: int = 2,
                             heads: int = 4, steps: int | None = None, seed: int = 0, vocab_size: int = 1024,
                             force: bool = False, log=print) -> Path:
    import torch

    quiet_libraries()
    out = Path(out)
    check_build_folder(out, data, force)
    torch.manual_seed(seed)
    texts = texts_of_rows(read_rows(data))
    tokenizer = tokenizer_with_pad(texts, vocab_size)
    model = model_for(arch, tokenizer, hidden=hidden, layers=layers, heads=heads)
    if steps is None:
        steps = 0 if arch == "bert" else 300
    loss = float("nan")
    if steps and model.config.is_encoder_decoder:
        loss = pretrain_seq2seq(model, tokenizer, texts, steps=steps, seed=seed)
        log(f"tiny {arch} base pre-trained for {steps} steps on {len(texts)} documents (final loss {loss:.3f})")
    save_tiny(out, model, tokenizer, {"built_by": f"lora build-tiny --arch {arch}", "data": str(data), "steps": steps,
                                      "seed": seed, "final_loss": loss}, force)
    log(f"tiny {arch} model written to {out}")
    return out


def pretraining_pairs(texts: list[str]) -> list[tuple[str, str]]:
    """(source, target) pairs: every document copied, and written in full from its first line."""
    pairs = []
    for doc in texts:
        pairs.append((doc, doc))
        first, sep, _ = doc.partition("\n")
        if sep:
            pairs.append((first, doc))
    return pairs


def pretrain_seq2seq(model, tokenizer, texts: list[str], *, steps: int, seed: int, batch: int = 16,
                     lr: float = 3e-3) -> float:
    import torch

    pairs = pretraining_pairs(texts)
    sources = [tokenizer(s)["input_ids"] for s, _ in pairs]
    targets = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for _, t in pairs]
    gen = torch.Generator().manual_seed(seed)

    def next_batch() -> dict:
        picks = torch.randint(0, len(pairs), (batch,), generator=gen).tolist()
        x, mask = _padded([sources[i] for i in picks], tokenizer.pad_token_id)
        y, _ = _padded([targets[i] for i in picks], -100)
        return {"input_ids": x, "attention_mask": mask, "labels": y}

    return optimize(model, next_batch, steps=steps, lr=lr)


def _padded(rows: list[list[int]], pad: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask
