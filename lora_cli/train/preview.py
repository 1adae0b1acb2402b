"""`lora data preview`: the training data as the model will see it, before any training."""

from __future__ import annotations

from dataclasses import replace

from rich.console import Console
from rich.text import Text

from lora_cli.train.objectives import objective_of
from lora_cli.data.template import IGNORE_INDEX
from lora_cli.ui.terminal import plain
from lora_cli.data.examples import build_sft_data, label_runs, lengths_of, pack_bins
from lora_cli.model.load import load_tokenizer
from lora_cli.train.preference import build_preference_data, preview_pairs

SUPERVISED_MARKS = ("[[", "]]")  # around supervised text, so colour never carries the meaning alone


def highlighted(example: dict, tokenizer) -> Text:
    """The decoded example, supervised stretches in green between SUPERVISED_MARKS, masked ones dimmed."""

    text = Text()
    opening, closing = SUPERVISED_MARKS
    for supervised, ids in label_runs(example):
        decoded = tokenizer.decode(ids)
        text.append(f"{opening}{decoded}{closing}" if supervised else decoded, style="bold green" if supervised else "dim")
    return text


def length_bins(lengths: list[int], max_length: int, bins: int = 8) -> list[tuple[int, int, int]]:
    """(shortest, longest, sequences) of each length bucket up to max_length."""
    step = max(1, -(-max_length // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - 1) // step)] += 1
    return [(b * step + 1, min(max_length, (b + 1) * step), c) for b, c in enumerate(counts)]


def length_histogram(lengths: list[int], max_length: int, bins: int = 8, width: int = 40) -> list[str]:
    """Text bars: how many sequences fall in each length bucket up to max_length."""
    buckets = length_bins(lengths, max_length, bins)
    top = max(c for _, _, c in buckets) or 1
    return [f"{lo:>6}-{hi:<6} {('#' if plain() else '█') * round(width * c / top):<{width}} {c}"
            for lo, hi, c in buckets]


def load_preview(recipe):
    """(tokenizer, data) as the preview shows them: an SFT recipe's rows one by one even when
    training packs them (packing is summarised apart), a preference recipe's pairs."""
    tokenizer = load_tokenizer(recipe.model.name_or_path, recipe.model.trust_remote_code)
    if objective_of(recipe).preference:
        return tokenizer, build_preference_data(recipe, tokenizer)
    return tokenizer, build_sft_data(replace(recipe.data, packing=False), tokenizer)


def preview_data(recipe, *, rows: int = 3, console: Console | None = None) -> None:
    """Print decoded rows with the supervised part highlighted, the length histogram, the share
    of supervised tokens and the counts kept / truncated / dropped."""
    console = console or Console()
    if objective_of(recipe).preference:  # a pair (or a labelled answer) per row, not one sequence

        return preview_pairs(recipe, console, rows)

    tokenizer, data = load_preview(recipe)
    data_cfg = recipe.data
    train, stats = data.train, data.stats
    formats = ", ".join(sorted(set(stats.formats.values()))) or data_cfg.format
    console.print(f"[bold]data[/]      {data_cfg.path} (format {formats}, template {data_cfg.template}, "
                  f"train_on {data_cfg.train_on}, max_length {data_cfg.max_length})")
    for i in range(min(rows, len(train))):
        rule, colour = ("--", "") if plain() else ("──", ", in green")  # piped: no green to point at
        console.print(Text(f"{rule} example {i + 1} ", style="bold")
                      .append(f"(supervised text between {' and '.join(SUPERVISED_MARKS)}{colour}; the rest is masked)", style="dim"))
        console.print(highlighted(train[i], tokenizer))
    console.print("[bold]lengths[/]   (tokens per sequence)")
    for line in length_histogram(lengths_of(train), data_cfg.max_length):
        console.print("  " + line, highlight=False)
    share = stats.supervised_tokens / stats.total_tokens if stats.total_tokens else 0.0
    console.print(f"[bold]supervised[/] {stats.supervised_tokens}/{stats.total_tokens} tokens ({100 * share:.1f}%)")
    console.print(f"[bold]rows[/]      {stats.rows} read, {stats.kept} kept, "
                  f"{sum(stats.truncated.values())} truncated, {sum(stats.dropped.values())} dropped")
    for reason, n in sorted(stats.truncated.items()):
        console.print(f"  truncated ({reason}): {n}")
    for reason, n in sorted(stats.dropped.items()):
        console.print(f"  dropped ({reason}): {n}")
    if stats.turn_flags:
        console.print("[bold]per-turn[/]  " + ", ".join(f"{n} turns {how}" for how, n in sorted(stats.turn_flags.items()))
                      + " by their own weight / loss_weight / train flag (overriding train_on)")
    if stats.from_cache:
        console.print("[bold]cache[/]     tokenised data reused (same files, tokenizer, template and settings)")
    if data.eval is not None:
        console.print(f"[bold]eval[/]      {len(data.eval)} held-out examples")
    if data_cfg.packing:
        lengths = lengths_of(train)
        packs = pack_bins(lengths, data_cfg.max_length)
        fill = sum(lengths) / (len(packs) * data_cfg.max_length)
        console.print(f"[bold]packing[/]   {len(lengths)} examples -> {len(packs)} sequences "
                      f"of <= {data_cfg.max_length} tokens ({100 * fill:.0f}% filled)")
