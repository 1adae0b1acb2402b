"""`lora build-tiny`: a small Llama-architecture base model built offline and deterministically.

No hub is reachable on the machines this toolkit is developed and tested on, so the demo and
the tests need a base they can make. It is made the way real bases are, only smaller:
a byte-level BPE tokenizer trained on the bundled text, then a short causal-LM pre-training
of a 2-layer Llama on that text as plain documents ("question\\nanswer", no chat markers).
The base so learns the language and the facts, not the Human/Assistant format or when to stop:
that is what the LoRA adapter has to teach it. (A randomly initialised base cannot reach
confident logits through LoRA alone, so a random tiny model would make a dishonest demo.)
The result is saved with save_pretrained and loaded afterwards by the same code as any model.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_cli.ui import progress
from lora_cli.files import atomic, ownership
from lora_cli.data.sources import read_rows
from lora_cli.libraries import quiet_libraries

BOS, EOS, UNK = "<s>", "</s>", "<unk>"

# A minimal chat template so tokenizer.apply_chat_template works on the tiny model too.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}Human: {{ m['content'] }}\n\nAssistant: "
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def corpus_from_rows(rows: list[dict]) -> list[str]:
    docs = []
    for r in rows:
        question = "\n".join(x for x in (r.get("instruction", ""), r.get("input", "")) if x)
        docs.append(f"{question}\n{r.get('output', '')}")
    return docs


def train_tokenizer(texts: list[str], vocab_size: int = 2048):
    """Byte-level BPE (GPT-2 / Llama-3 style) trained on `texts`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The chat markers are in the corpus so they become tokens, as they would in a real vocabulary.
    tok.train_from_iterator(texts + ["Human: \n\nAssistant: ", "### Instruction:\n### Response:\n"], trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama: BOS in front of every encoded text; EOS only where the data puts it.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK)
    fast.chat_template = CHAT_TEMPLATE
    return fast


MARKER = "TINY_MODEL.json"  # how the model was built (data, steps, seed, final loss)


def check_build_folder(out: Path, data: str | Path, force: bool = False) -> None:
    """The one output check (lora_cli.files.ownership.check_output): a new or empty folder, or with
    --force one an earlier build-tiny wrote and nothing else touched; never the --data file."""

    ownership.check_output(Path(out), "build-tiny", force=force, folder=True, inputs=[("data (--data)", data)])


def save_tiny(out: Path, model, tokenizer, record: dict, force: bool) -> None:
    """Model, tokenizer and MARKER staged and renamed into place whole (lora_cli.files.ownership)."""

    with ownership.writing_folder(Path(out), "build-tiny", force) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps(record, indent=2))


def build_tiny_model(out: str | Path, data: str | Path, *, hidden: int = 128, layers: int = 2,
                     heads: int = 4, steps: int = 300, seed: int = 0, vocab_size: int = 2048,
                     tie_word_embeddings: bool = False, force: bool = False, log=print) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet_libraries()
    out = Path(out)
    check_build_folder(out, data, force)
    torch.manual_seed(seed)
    texts = corpus_from_rows(read_rows(data))
    tokenizer = train_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2 + hidden // 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings, rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config)
    loss = pretrain(model, tokenizer, texts, steps=steps, seed=seed) if steps else float("nan")
    if steps:
        log(f"tiny base pre-trained for {steps} steps on {len(texts)} documents (final loss {loss:.3f})")
    save_tiny(out, model, tokenizer, {"built_by": "lora build-tiny", "data": str(data), "steps": steps, "seed": seed,
                                      "final_loss": loss}, force)
    log(f"tiny base model written to {out}")
    return out


def pretrain(model, tokenizer, texts: list[str], *, steps: int, seed: int, block: int = 128,
             batch: int = 16, lr: float = 3e-3) -> float:
    """Plain next-token pre-training on concatenated documents (BOS text EOS ...)."""
    import torch

    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    data = torch.tensor(ids)
    n_blocks = max(1, (len(data) - 1) // block)
    gen = torch.Generator().manual_seed(seed)

    def next_batch() -> dict:
        starts = torch.randint(0, len(data) - block - 1, (batch,), generator=gen) if n_blocks > 1 else torch.zeros(batch, dtype=torch.long)
        x = torch.stack([data[s:s + block] for s in starts])
        return {"input_ids": x, "labels": x}

    return optimize(model, next_batch, steps=steps, lr=lr)


def optimize(model, next_batch, *, steps: int, lr: float) -> float:
    """The tiny bases' pre-training loop: AdamW under a one-cycle schedule, clipped gradients;
    next_batch() gives each step's model inputs. Returns the last loss."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = model(**next_batch()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        progress.advance()
    model.eval()
    return float(loss.detach())
