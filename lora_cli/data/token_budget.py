"""How much text can matter for a number of tokens, known before tokenising it.

No token of a vocabulary covers more characters than its longest entry spells (byte-level
BPE spells one byte per character, SentencePiece one character per character, byte-fallback
pieces more), so a text of more than `chars_for(tokenizer, n)` characters surely holds more than
n tokens. That bounds what is worth tokenising: a 10 MB row or a 6 MB chat message is refused
(`lora serve`, `lora generate`) or clipped (training rows, which keep max_length tokens anyway)
in microseconds, instead of being tokenised whole (seconds, gigabytes).

NORMALISER_SLACK covers normalisers that shorten text (NFC composes a letter and its accent
into one character; Hangul jamo compose three into one)."""

from __future__ import annotations

NORMALISER_SLACK = 4
_LONGEST: dict[int, tuple[object, int]] = {}  # id(tokenizer) -> (tokenizer, longest entry)


def longest_token_chars(tokenizer) -> int:
    """Characters of the vocabulary's longest entry (added tokens included), once per tokenizer."""
    cached = _LONGEST.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    vocab = tokenizer.get_vocab()
    added = getattr(tokenizer, "all_special_tokens", []) or []
    longest = max([len(t) for t in vocab] + [len(t) for t in added] + [1])
    _LONGEST[id(tokenizer)] = (tokenizer, longest)
    return longest


def chars_for(tokenizer, tokens: int) -> int:
    """A number of characters past which a text surely holds more than `tokens` tokens."""
    return tokens * longest_token_chars(tokenizer) * NORMALISER_SLACK


def clip_for_tokens(text: str, tokenizer, tokens: int) -> str:
    """`text` with its middle dropped when it is too long to matter whole: its first and last
    chars_for(tokens) characters each still hold more than `tokens` tokens, so whichever end
    truncation to `tokens` keeps is tokenised exactly as in the whole text (barring a merge
    across the cut, far from either end)."""
    keep = chars_for(tokenizer, tokens)
    if len(text) <= 2 * keep:
        return text
    return text[:keep] + text[-keep:]
