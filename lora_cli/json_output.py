"""`--json`: the layouts scripts read, one function per command (documented in docs/cli.md).

Every document carries `"lora_json": LAYOUT_VERSION`; a key is only ever added within a
version, never renamed or removed, so a script written today keeps working."""

from __future__ import annotations

import json
import sys
from collections import Counter

from lora_cli.data.batching import batch_shape
from lora_cli.data.examples import label_runs, lengths_of, pack_bins
from lora_cli.train.estimate import fits
from lora_cli.train.preview import length_bins

LAYOUT_VERSION = 1


def emit(kind: str, body: dict) -> None:
    """Print one JSON document on stdout (nothing else goes there under --json)."""
    doc = {"lora_json": LAYOUT_VERSION, "kind": kind, **body}
    sys.stdout.write(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")


def check_doc(source, findings, strict: bool) -> dict:
    return {"recipe": str(source), "ok": not (findings and strict), "strict": strict,
            "warnings": [{"key": f.key, "problem": f.problem, "why": f.reason, "try": f.suggestion}
                         for f in findings]}


def estimate_doc(est, recipe) -> dict:
    p, m = est.params, est.memory
    return {
        "model": {"class": est.model_class, "name_or_path": recipe.model.name_or_path},
        "adapter": {"method": recipe.lora.method, "r": recipe.lora.r, "alpha": recipe.lora.alpha,
                    "target_modules": recipe.lora.target_modules, "file_bytes": p.adapter_bytes,
                    "targets": [{"name": g.name, "modules": g.count, "shapes": sorted(g.shapes),
                                 "lora_params": g.lora_params} for g in p.groups]},
        "params": {"trainable": p.trainable, "total": p.total, "lora": p.lora_params,
                   "trained_in_full": p.full_params, "per_rank": p.per_rank},
        "memory": {"batch_size": batch_shape(recipe.train, recipe.data.max_length).batch_size,
                   "max_length": recipe.data.max_length,
                   "components": [{"component": name, "bytes": b, "counted_as": how} for name, b, how in m.rows],
                   "activations_bytes": m.activations, "activations_checkpointed_bytes": m.activations_checkpointed,
                   "total_bytes": m.total, "total_checkpointed_bytes": m.total_checkpointed,
                   "recipe_checkpointing": m.checkpointing,
                   "fits_gb": fits(m.total), "fits_gb_checkpointed": fits(m.total_checkpointed)},
        "budget": None if est.budget is None else {"trainable": est.budget, "largest_rank": est.budget_rank},
    }


def preview_doc(recipe, source, tokenizer, data, rows: int) -> dict:
    """`lora data preview --json`: the first `rows` examples decoded, cut into supervised and
    masked stretches (an SFT recipe) or prompt and answers (a preference recipe), and the counts."""
    d, stats, train = recipe.data, data.stats, data.train
    pairs = "prompt_ids" in train.column_names
    shown = [train[i] for i in range(min(rows, len(train)))]
    lengths = None if pairs else lengths_of(train)
    packs = pack_bins(lengths, d.max_length) if d.packing and lengths else None
    return {
        "recipe": str(source),
        "data": {"path": d.path, "formats": sorted(set(stats.formats.values())), "template": d.template,
                 "train_on": d.train_on, "max_length": d.max_length, "objective": recipe.train.objective},
        "examples": [(_pair_example if pairs else _sft_example)(ex, tokenizer) for ex in shown],
        "rows": {"read": stats.rows, "kept": stats.kept, "truncated": dict(stats.truncated),
                 "dropped": dict(stats.dropped)},
        "tokens": {"supervised": stats.supervised_tokens, "total": stats.total_tokens},
        "lengths": None if lengths is None else {
            "min": min(lengths, default=0), "max": max(lengths, default=0),
            "histogram": [{"from": lo, "to": hi, "sequences": n} for lo, hi, n in length_bins(lengths, d.max_length)]},
        "per_turn": dict(stats.turn_flags),
        "from_cache": stats.from_cache,
        "eval_examples": None if data.eval is None else len(data.eval),
        "packing": None if packs is None else {
            "examples": len(lengths), "sequences": len(packs),
            "fill": sum(lengths) / (len(packs) * d.max_length)},
    }


def _sft_example(example: dict, tokenizer) -> dict:
    runs = label_runs(example)
    return {"tokens": len(example["input_ids"]), "supervised_tokens": sum(len(ids) for sup, ids in runs if sup),
            "segments": [{"supervised": sup, "text": tokenizer.decode(ids)} for sup, ids in runs]}


def _pair_example(example: dict, tokenizer) -> dict:
    """A pair's prompt (masked) and both answers, or a labelled answer (kto)."""
    out = {"prompt": tokenizer.decode(example["prompt_ids"])}
    if "chosen_ids" in example:
        return {**out, "chosen": tokenizer.decode(example["chosen_ids"]),
                "rejected": tokenizer.decode(example["rejected_ids"])}
    return {**out, "completion": tokenizer.decode(example["completion_ids"]), "good": bool(example["label"])}


def predict_doc(adapter, file, out, rows: list[dict], labels: list[str], report) -> dict:
    """`lora predict --json`: the summary (each row's label and probabilities are in --out)."""
    counts = Counter(r["label"] for r in rows)
    return {"adapter": str(adapter), "file": str(file), "out": str(out), "rows": len(rows), "labels": list(labels),
            "predicted": {name: counts.get(name, 0) for name in labels},
            "report": report.to_dict() if report is not None else None}


def analyze_doc(analysis, plot) -> dict:
    """`lora analyze --json`: the verdict and every adapted module's spectrum."""
    return {"adapter": str(analysis.path), "verdict": analysis.verdict, "suggested_rank": analysis.suggested_rank,
            "summary": analysis.summary, "trained_in_full": list(analysis.full_modules),
            "plot": None if plot is None else str(plot),
            "modules": [{"name": m.name, "short": m.short, "r": m.rank, "scaling": m.scaling,
                         "rank90": m.effective_rank(0.9), "rank99": m.effective_rank(0.99),
                         "stable_rank": m.stable_rank, "update_norm": m.update_norm,
                         "weight_norm": m.weight_norm, "relative_norm": m.relative_norm,
                         "singular_values": m.singular_values} for m in analysis.modules]}
