"""The adapter methods, one declaration each: what every part of the toolkit needs to know.

Recipe validation (which lora.* keys a method reads), adapter building (its peft config),
`lora estimate` (which trainable parameters grow with the rank), `lora check` (whether the
rank rules apply, whether alpha is scaled by sqrt(r)), `lora sweep` (whether there is a rank
to sweep) and `lora merge` (whether it can be folded into the base) all read METHODS, so a
method is added here, in one entry, plus its tests (tests/model/test_methods.py walks the registry).
Nothing here imports torch or peft at module level: `lora check` reads this too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lora_cli.model.targets import ia3_feedforward, resolve_target_modules
from lora_cli.tasks import get_task

# The lora.* keys each kind of method reads. Any other lora.* key written in the recipe is an
# error, so an option never silently does nothing.
EVERY_METHOD_KEYS = frozenset({"adapter_dtype"})  # how the trained weights are stored
LOW_RANK_KEYS = EVERY_METHOD_KEYS | {"r", "alpha", "dropout", "init", "target_modules", "bias", "modules_to_save"}
VIRTUAL_TOKEN_KEYS = EVERY_METHOD_KEYS | {"num_virtual_tokens"}

# Which lora.init means which peft init_lora_weights.
PEFT_INIT = {"gaussian": "gaussian", "kaiming": True, "pissa": "pissa", "olora": "olora"}

# Parameter names of the low-rank factors A and B (for linear and embedding layers).
RANK_PARAMETER_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")


@dataclass(frozen=True)
class Method:
    name: str
    doc: str                 # how the recipe reference describes it
    keys: frozenset          # the lora.* keys it reads (besides lora.method)
    peft_type: str           # peft's name for it in adapter_config.json
    has_rank: bool           # r and alpha mean something: rank rules, sweeps, --budget
    merges: bool             # `lora merge` can fold it into the base weights
    rslora_scaling: bool     # the update is scaled by alpha / sqrt(r), not alpha / r
    peft_config: Callable    # (recipe, model) -> the peft config that builds it
    rank_parameters: Callable  # (peft model) -> trainable parameters that grow with r (0 without a rank)
    problems: Callable = lambda recipe: []  # (recipe) -> what this method cannot combine with

    @property
    def learns_virtual_tokens(self) -> bool:
        """prompt_tuning / prefix_tuning: no module is wrapped, tokens are learned instead."""
        return "num_virtual_tokens" in self.keys


# --------------------------------------------------------------------------- peft configs

def _task_type(recipe):
    """peft's task type for model.task (SEQ_CLS also trains and saves the classification head whole)."""
    from peft import TaskType

    return TaskType[get_task(recipe.model.task).peft_task_type]


def _lora_config(recipe, model):
    from peft import LoraConfig

    lora = recipe.lora
    return LoraConfig(
        task_type=_task_type(recipe),
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=resolve_target_modules(model, lora.target_modules),
        bias=lora.bias,
        modules_to_save=lora.modules_to_save or None,
        init_lora_weights=PEFT_INIT[lora.init],
        use_dora=lora.method == "dora",
        use_rslora=METHODS[lora.method].rslora_scaling,
    )


def _ia3_config(recipe, model):
    from peft import IA3Config

    targets = resolve_target_modules(model, recipe.lora.target_modules)
    return IA3Config(task_type=_task_type(recipe), target_modules=targets,
                     feedforward_modules=ia3_feedforward(model, targets),
                     modules_to_save=recipe.lora.modules_to_save or None)


def _prompt_tuning_config(recipe, model):
    from peft import PromptTuningConfig, PromptTuningInit

    lora = recipe.lora
    text = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": lora.prompt_init_text,
            "tokenizer_name_or_path": recipe.model.name_or_path} if lora.prompt_init_text else {}
    return PromptTuningConfig(task_type=_task_type(recipe), num_virtual_tokens=lora.num_virtual_tokens, **text)


def _prefix_tuning_config(recipe, model):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type=_task_type(recipe), num_virtual_tokens=recipe.lora.num_virtual_tokens)


# --------------------------------------------------------------------------- counting and checks

def _low_rank_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters()
               if p.requires_grad and any(part in n for part in RANK_PARAMETER_PARTS))


def _no_rank_parameters(model) -> int:
    return 0


def _virtual_token_problems(recipe) -> list[str]:
    """Virtual tokens go in front of a token stream, which only some tasks are."""
    if get_task(recipe.model.task).token_stream:
        return []
    return [f"lora.method: {recipe.lora.method} is only wired for model.task causal_lm; use lora, dora, rslora or ia3"]


def _prompt_tuning_problems(recipe) -> list[str]:
    problems = _virtual_token_problems(recipe)
    text = recipe.lora.prompt_init_text
    if text is not None and not text.strip():
        problems.append("lora.prompt_init_text: empty text; write the text to start from, or remove the key for random tokens")
    return problems


def _prefix_tuning_problems(recipe) -> list[str]:
    problems = _virtual_token_problems(recipe)
    if recipe.train.gradient_checkpointing:
        problems.append("lora.method: prefix_tuning cannot run with train.gradient_checkpointing (peft feeds the prefix "
                        "in as a key/value cache, which checkpointing turns off); set train.gradient_checkpointing: "
                        "false or use prompt_tuning")
    return problems


# --------------------------------------------------------------------------- the registry

def _low_rank(name: str, doc: str, **flags) -> Method:
    return Method(name, doc, LOW_RANK_KEYS, "LORA", has_rank=True, merges=True, peft_config=_lora_config,
                  rank_parameters=_low_rank_parameters, **{"rslora_scaling": False, **flags})


METHODS: dict[str, Method] = {m.name: m for m in (
    _low_rank("lora", "lora"),
    _low_rank("dora", "dora (magnitude + direction)"),
    _low_rank("rslora", "rslora (scale alpha/sqrt(r))", rslora_scaling=True),
    Method("ia3", "ia3 (learned scaling vectors)", EVERY_METHOD_KEYS | {"target_modules", "modules_to_save"}, "IA3",
           has_rank=False, merges=True, rslora_scaling=False, peft_config=_ia3_config,
           rank_parameters=_no_rank_parameters),
    Method("prompt_tuning", "prompt_tuning (learned virtual tokens)", VIRTUAL_TOKEN_KEYS | {"prompt_init_text"},
           "PROMPT_TUNING", has_rank=False, merges=False, rslora_scaling=False,
           peft_config=_prompt_tuning_config, rank_parameters=_no_rank_parameters, problems=_prompt_tuning_problems),
    Method("prefix_tuning", "prefix_tuning (learned key/value prefixes)", VIRTUAL_TOKEN_KEYS, "PREFIX_TUNING",
           has_rank=False, merges=False, rslora_scaling=False, peft_config=_prefix_tuning_config,
           rank_parameters=_no_rank_parameters, problems=_prefix_tuning_problems),
)}

METHOD_NAMES = tuple(METHODS)  # the recipe's lora.method choices
RANKED = tuple(name for name, m in METHODS.items() if m.has_rank)


def method_of(recipe) -> Method:
    return METHODS[recipe.lora.method]


def for_peft_type(peft_type: str) -> Method | None:
    """The first method peft saves under this type (LORA: lora, whose answers dora and rslora share)."""
    return next((m for m in METHODS.values() if m.peft_type == peft_type.upper()), None)
