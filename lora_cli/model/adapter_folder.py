"""The adapter folder, in one place: the files peft saves an adapter as, the recipe saved beside
it, reading it (AdapterInfo) and the one check every command runs before it loads one.

What it holds: adapter_config.json (peft's), adapter_model.safetensors (never a pickle), and the
resolved lora_recipe.yaml that `lora train` writes (a checkpoint-N folder inherits its run's).
Nothing here imports torch."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lora_cli.data.template import TemplateSpec
from lora_cli.errors import LoraError
from lora_cli.ui.nearby import closest, listing
from lora_cli.tasks import get_task
from lora_cli.files.inputs import first_line, read_text, shorten
from lora_cli.files.model_files import refuse_pickle_weights, safetensors_shapes
from lora_cli.files.yaml_input import MAX_YAML_BYTES, safe_yaml

ADAPTER_CONFIG = "adapter_config.json"    # the files peft saves an adapter as
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RECIPE_FILE = "lora_recipe.yaml"  # the resolved recipe, saved beside every adapter
CHECKPOINT_PREFIX = "checkpoint"  # checkpoint-N: an adapter folder a run saved at step N
_STEP = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


@dataclass
class AdapterInfo:
    path: Path
    base: str            # base_model_name_or_path from adapter_config.json
    recipe: dict | None  # the resolved recipe saved with it, when there is one
    config: dict = field(default_factory=dict)  # adapter_config.json as saved by peft

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "LORA")).upper()

    @property
    def template(self):
        """The TemplateSpec training rendered prompts with (name, formats, system prompt)."""
        return TemplateSpec.from_data((self.recipe or {}).get("data"))

    @property
    def model_section(self) -> dict:
        return dict((self.recipe or {}).get("model") or {})


def checkpoint_step(path: Path) -> int | None:
    """N for a checkpoint-N folder, else None."""
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


def find_recipe_file(adapter_dir: Path) -> Path | None:
    """The recipe saved with an adapter; a checkpoint-N folder inherits its run's."""
    for folder in (adapter_dir, adapter_dir.parent):
        if (folder / RECIPE_FILE).is_file():
            return folder / RECIPE_FILE
    return None


def read_adapter(path: str | Path) -> AdapterInfo:
    path = Path(path)
    cfg_file = path / ADAPTER_CONFIG
    if not path.exists():
        raise LoraError(f"{path} does not exist", missing_adapter_hint(path)
                        or "pass a run's output_dir, a checkpoint-N folder inside it, or a `lora save` folder")
    if not cfg_file.is_file():
        hint = "pass the run's output_dir or a checkpoint-N folder inside it"
        ckpts = sorted(path.glob("checkpoint-*")) if path.is_dir() else []
        if ckpts:
            hint = f"this folder has checkpoints but no final adapter; try {ckpts[-1]}"
        raise LoraError(f"{path}: no adapter_config.json, so this is not an adapter folder", hint)
    try:
        config = json.loads(read_text(cfg_file, max_bytes=MAX_YAML_BYTES))
    except json.JSONDecodeError as e:
        raise LoraError(f"{cfg_file}: not valid JSON ({e.msg}, line {e.lineno})",
                        "the adapter folder is damaged; export it again with `lora save`") from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base or not isinstance(base, str):
        raise LoraError(f"{cfg_file}: no base_model_name_or_path, so the base model is unknown",
                        "pass --base MODEL, or add base_model_name_or_path to adapter_config.json")
    recipe_file = find_recipe_file(path)
    try:
        recipe = safe_yaml(read_text(recipe_file, max_bytes=MAX_YAML_BYTES), str(recipe_file)) if recipe_file else None
    except yaml.YAMLError as e:
        raise LoraError(f"{recipe_file}: not valid YAML ({first_line(e)})", "remove it or export the adapter again") from None
    if recipe is not None and not isinstance(recipe, dict):
        raise LoraError(f"{recipe_file}: not a recipe (a mapping of sections)", "remove it or export the adapter again")
    return AdapterInfo(path=path, base=base, recipe=recipe, config=config)


# --------------------------------------------------------------------------- what exists instead

def adapter_folders(folder: Path) -> list[str]:
    """Paths of the adapter folders in `folder` and of the checkpoints inside them, newest checkpoint last."""
    if not folder.is_dir():
        return []
    found = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (child / ADAPTER_CONFIG).is_file():
            found.append(child)
    checkpoints = [p for p in found if checkpoint_step(p) is not None]
    others = [p for p in found if checkpoint_step(p) is None]
    return [str(p) for p in others + sorted(checkpoints, key=checkpoint_step)]


def missing_adapter_hint(path: Path) -> str | None:
    """For an adapter path that does not exist: the adapter folders and checkpoints beside it
    (a run's checkpoints when `path` names a checkpoint of a run), or None when nothing is near."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    while not parent.is_dir() and parent != parent.parent:  # runs/nosuch/checkpoint-9: look in runs/
        parent = parent.parent
    found = adapter_folders(parent)
    if not found:
        return None
    return listing(found, "adapters") + closest(str(path), found)


# --------------------------------------------------------------------------- checking before loading

_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_(?:embedding_)?([AB])(?:\.weight)?")  # as peft saves them


def verify_adapter(path: str | Path):
    """The one check every command runs before it reads an adapter folder: its config parses
    (read_adapter), its weights are safetensors (never a pickle), the file is whole, and for
    LoRA-family adapters every A/B pair has the shapes the config's r says, on a module its
    target_modules names. Returns the AdapterInfo."""
    info = read_adapter(path)
    problems = adapter_config_problems(info.config)
    if problems:
        raise LoraError(f"{info.path / 'adapter_config.json'}: {'; '.join(problems)}",
                        "the file was edited or damaged; export the adapter again with `lora save`")
    refuse_pickle_weights(info.path, "adapter")
    weights = info.path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LoraError(f"{info.path}: no {ADAPTER_WEIGHTS}",
                        "pass a folder written by `lora train` or `lora save` (safetensors weights)")
    shapes = safetensors_shapes(weights)
    if not shapes:
        raise LoraError(f"{weights}: holds no tensors", "the adapter is empty; export it again")
    if info.peft_type == "LORA":
        problems = lora_shape_problems(info.config, shapes)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise LoraError(f"{weights} does not match {info.path / 'adapter_config.json'}: {problems[0]}{more}",
                            "the two files come from different adapters or were edited; export the adapter again")
    return info


LORA_KINDS = ("LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING")  # what `lora train` writes


def _known_peft_type(kind: str) -> bool:
    if kind in LORA_KINDS:
        return True
    from peft import PeftType  # only for adapters another tool wrote: peft imports torch

    return kind in PeftType.__members__


def adapter_config_problems(config: dict) -> list[str]:
    """Values in adapter_config.json that peft would trip over with a traceback."""
    kind = config.get("peft_type", "LORA")
    if not isinstance(kind, str) or not _known_peft_type(kind.upper()):
        return [f"peft_type {shorten(kind)} is not a peft adapter kind"]
    if kind.upper() != "LORA":
        return []
    problems = []
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"r {shorten(r)} is not a positive integer")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        problems.append(f"lora_alpha {shorten(alpha)} is not a number")
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        problems.append(f"target_modules {shorten(targets)} is not a module name, a list of them or a regex")
    elif isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as e:
            problems.append(f"target_modules {shorten(targets)} is not a valid regex ({e})")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            problems.append(f"{name} {shorten(config.get(name))} is not a mapping")
    if config.get("megatron_config"):  # peft would import the module megatron_core names: a folder never picks code
        problems.append(f"megatron_config is set (megatron_core {shorten(config.get('megatron_core'))}: a module peft "
                        "would import); lora loads no Megatron adapters")
    return problems


def _rank_of(config: dict, module: str) -> int | None:
    """peft's rank for a module: a rank_pattern key matching the module's name, else r."""
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        try:
            if re.match(rf"(.*\.)?{pattern}$", module):
                return rank if isinstance(rank, int) and not isinstance(rank, bool) else None
        except re.error:
            return None  # a pattern peft cannot use either; the shapes are not checked against it
    r = config.get("r")
    return r if isinstance(r, int) and not isinstance(r, bool) else None


def _targets(config: dict, module: str) -> bool:
    """Whether target_modules names the module (peft's rule: a list matches the name or its
    last dotted parts, a string is a regex over the full name)."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def lora_shape_problems(config: dict, shapes: dict[str, list[int]]) -> list[str]:
    """What in a LoRA weights file disagrees with its adapter_config.json."""
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, shape in shapes.items():
        m = _LORA_KEY.fullmatch(name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = shape
    if not pairs:
        return ["no lora_A / lora_B tensors"]
    problems = []
    for module, sides in sorted(pairs.items()):
        if set(sides) != {"A", "B"}:
            problems.append(f"{module} has lora_{next(iter(sides))} but not its pair")
            continue
        if not _targets(config, module):
            problems.append(f"{module} is not among target_modules {config.get('target_modules')}")
        rank = _rank_of(config, module)
        # A is (r, in) and B (out, r); embeddings and convolutions keep r at the same places
        if rank is not None and (sides["A"][:1] != [rank] or sides["B"][1:2] != [rank]):
            problems.append(f"{module}: lora_A {sides['A']} / lora_B {sides['B']} do not have rank r={rank}")
    return problems


def refuse_unless(capability: str, adapters: dict, command: str, hint: str) -> None:
    """A command that needs a capability (generates, predicts_labels) refuses, before loading
    anything, adapters whose model.task lacks it."""
    for name, path in adapters.items():
        task = get_task(read_adapter(path).model_section.get("task"))
        if not getattr(task, capability):
            raise LoraError(f"{command}: adapter {path} was trained for model.task {task.name}, which it cannot serve",
                            hint.format(adapter=path))  # the hint names this adapter, ready to paste
