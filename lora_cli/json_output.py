"""`--json`: the layouts scripts read, one function per command (documented in docs/cli.md).

Every document carries `"lora_json": LAYOUT_VERSION`; a key is only ever added within a
version, never renamed or removed, so a script written today keeps working."""

from __future__ import annotations

import json
import sys
from lora_cli.data.batching import batch_shape
from lora_cli.train.estimate import fits

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
