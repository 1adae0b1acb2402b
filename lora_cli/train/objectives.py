"""What the adapter learns *from*: `train.objective`, one registry that train, estimate, check,
dry-run and preview read.

- sft (the default): answers, supervised token by token (data.py; the Trainer's own loss).
- dpo: pairs of a chosen and a rejected answer to one prompt; TRL's DPOTrainer. The reference
  policy is the base with the adapter switched off (peft), never a second copy of the model.
- orpo: pairs; TRL's ORPOTrainer (the chosen answer's SFT loss plus an odds-ratio term; no
  reference pass).
- simpo: pairs; TRL's CPOTrainer with loss_type simpo (length-normalised reward with a
  target margin; no reference pass), which is how TRL runs SimPO.
- kto: single answers marked good or bad (`label`); TRL's KTOTrainer, reference as dpo.

Each Objective says which train.* keys it reads (the others are refused when written), what
rows it trains on, whether it runs a reference pass, how many sequences a row becomes, which
TRL trainer and config run it, and which loss variants it accepts. Nothing here imports torch
or trl at module level: recipe validation reads this registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from lora_cli.tasks import get_task

# The loss variants TRL 1.16's trainers accept, per objective (their loss_type); the first is the default.
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                  "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
LOSS_TYPES = tuple(dict.fromkeys(DPO_LOSS_TYPES + KTO_LOSS_TYPES))  # the recipe's train.loss_type choices

SFT, PAIRS, UNPAIRED = "sft", "pairs", "unpaired"  # the kinds of rows an objective trains on
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "completion", "label", "instruction", "input", "system",
                     "messages", "conversations")  # the preference row fields data.columns may map


@dataclass(frozen=True)
class Objective:
    name: str
    doc: str
    rows: str                    # SFT (answers), PAIRS (prompt, chosen, rejected), UNPAIRED (prompt, completion, label)
    keys: frozenset = field(default_factory=frozenset)  # the train.* keys it reads, beyond the common ones
    reference: bool = False      # a reference pass (the base with the adapter off) per batch
    trainer: str = ""            # "module:Class" of the TRL trainer ("" = the Trainer with data.py's loss)
    config: str = ""             # "module:Class" of its TrainingArguments subclass
    default_beta: float | None = None
    beta_doc: str = ""           # what train.beta means to it, for the key's doc (objectives sharing a meaning share a line)
    loss_types: tuple = ()       # accepted train.loss_type values; the first is the default
    lr_red_flag: float | None = None  # above this learning rate preference tuning usually collapses
    settings: Callable | None = None  # (objective, recipe) -> its TRL config's own keyword arguments

    @property
    def preference(self) -> bool:
        """Trained on preferences (pairs or labelled answers) by a TRL trainer, not on answers alone."""
        return self.rows != SFT

    @property
    def sequences_per_row(self) -> int:
        """Sequences one training row becomes in a forward pass: chosen + rejected for pairs;
        KTO adds a mismatched (KL) completion per row for its reference point."""
        return 1 if self.rows == SFT else 2

    def loss_type(self, recipe) -> str | None:
        return recipe.train.loss_type or (self.loss_types[0] if self.loss_types else None)

    def beta(self, recipe) -> float | None:
        return recipe.train.beta if recipe.train.beta is not None else self.default_beta

    def trl_class(self, which: str):
        import importlib
        import os

        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO / CPO live in trl.experimental: no warning on stderr

        module, _, name = (self.trainer if which == "trainer" else self.config).partition(":")
        return getattr(importlib.import_module(module), name)

    def config_kwargs(self, recipe) -> dict:
        """The objective's own settings, as its TRL config names them."""
        return self.settings(self, recipe) if self.settings else {}


def _dpo_settings(obj: Objective, r) -> dict:
    return {"beta": obj.beta(r), "loss_type": [obj.loss_type(r)]}


def _kto_settings(obj: Objective, r) -> dict:
    return {"beta": obj.beta(r), "loss_type": obj.loss_type(r),
            "desirable_weight": r.train.desirable_weight, "undesirable_weight": r.train.undesirable_weight}


def _simpo_settings(obj: Objective, r) -> dict:
    # TRL runs SimPO as CPO with loss simpo and no behaviour-cloning term (cpo_alpha 0)
    return {"beta": obj.beta(r), "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": r.train.simpo_gamma}


def _orpo_settings(obj: Objective, r) -> dict:
    return {"beta": r.train.orpo_lambda}  # ORPOConfig.beta is the paper's lambda


MOVES_FROM_REFERENCE = "how far the policy may move from the reference (DPO's beta; higher = closer)"

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("sft", "sft = answers, supervised token by token", SFT),
    Objective("dpo", "dpo = pairs (chosen / rejected); TRL's DPOTrainer, reference = base with the adapter off",
              PAIRS, frozenset({"beta", "loss_type"}), reference=True,
              trainer="trl:DPOTrainer", config="trl:DPOConfig", default_beta=0.1, loss_types=DPO_LOSS_TYPES,
              lr_red_flag=1e-4, settings=_dpo_settings, beta_doc=MOVES_FROM_REFERENCE),
    Objective("orpo", "orpo = pairs; SFT loss plus an odds-ratio term, no reference (TRL's ORPOTrainer)",
              PAIRS, frozenset({"orpo_lambda"}),
              trainer="trl.experimental.orpo:ORPOTrainer", config="trl.experimental.orpo:ORPOConfig",
              lr_red_flag=5e-4, settings=_orpo_settings),
    Objective("simpo", "simpo = pairs; length-normalised reward with a margin, no reference (TRL's CPOTrainer, loss simpo)",
              PAIRS, frozenset({"beta", "simpo_gamma"}),
              trainer="trl.experimental.cpo:CPOTrainer", config="trl.experimental.cpo:CPOConfig", default_beta=2.0,
              lr_red_flag=1e-4, settings=_simpo_settings, beta_doc="the reward scale"),
    Objective("kto", "kto = answers labelled good / bad (label: true / false); TRL's KTOTrainer, reference = base with the adapter off",
              UNPAIRED, frozenset({"beta", "loss_type", "desirable_weight", "undesirable_weight"}), reference=True,
              trainer="trl:KTOTrainer", config="trl:KTOConfig", default_beta=0.1, loss_types=KTO_LOSS_TYPES,
              lr_red_flag=1e-4, settings=_kto_settings, beta_doc=MOVES_FROM_REFERENCE),
)}
OBJECTIVE_NAMES = tuple(OBJECTIVES)
OBJECTIVE_KEYS = frozenset(k for o in OBJECTIVES.values() for k in o.keys)  # train.* keys owned by objectives


def beta_doc() -> str:
    """train.beta's doc: what it means to each objective that reads it, and each one's default."""
    meanings: dict[str, list[str]] = {}
    defaults: dict[float, list[str]] = {}
    for o in OBJECTIVES.values():
        if "beta" in o.keys:
            meanings.setdefault(o.beta_doc, []).append(o.name)
            defaults.setdefault(o.default_beta, []).append(o.name)
    return ("; ".join(f"{' / '.join(names)}: {doc}" for doc, names in meanings.items())
            + "; empty = the objective's default ("
            + "; ".join(f"{', '.join(names)} {value}" for value, names in defaults.items()) + ").")


def get_objective(name: str | None) -> Objective:
    return OBJECTIVES[name or "sft"]


def objective_of(recipe) -> Objective:
    return get_objective(recipe.train.objective)


def column_fields(recipe) -> tuple | None:
    """The row fields data.columns may map for a preference objective; None = data.format decides."""
    return PREFERENCE_FIELDS if objective_of(recipe).preference else None


def recipe_problems(r, explicit: frozenset) -> list[str]:
    """train.objective's cross-field checks (part of recipe.cross_checks); `explicit`: the train.*
    keys the recipe wrote."""
    obj = objective_of(r)
    problems = [f"train.{k}: does not apply to train.objective {obj.name} (it reads: "
                f"{', '.join(sorted(obj.keys)) or 'none of the objective keys'}); remove train.{k} or choose an "
                "objective that uses it" for k in sorted((explicit & OBJECTIVE_KEYS) - obj.keys)]
    if r.train.loss_type is not None and "loss_type" in obj.keys and r.train.loss_type not in obj.loss_types:
        problems.append(f"train.loss_type: {r.train.loss_type} is not a loss of train.objective {obj.name}; "
                        f"use one of: {', '.join(obj.loss_types)}")
    if "beta" in obj.keys and r.train.beta is not None and r.train.beta <= 0:
        problems.append(f"train.beta: must be above 0 for {obj.name} (got {r.train.beta}); "
                        f"{obj.default_beta} is the usual start")
    if not obj.preference:
        return problems
    if not get_task(r.model.task).token_stream:
        problems.append(f"train.objective: {obj.name} trains a causal language model (model.task is {r.model.task}); "
                        "use train.objective sft, or model.task causal_lm")
    if r.data.packing:
        problems.append(f"data.packing: not for train.objective {obj.name} (a pair's two answers share one prompt "
                        "and are compared, not packed); remove data.packing")
    if r.data.format not in ("auto",):
        problems.append(f"data.format: train.objective {obj.name} reads preference rows (detected from the file); "
                        "remove data.format")
    if r.eval.metrics:  # the end-of-run eval asks SFT rows' questions; a pair file has none of its shape
        problems.append(f"eval.metrics: scores answers to SFT validation rows; train.objective {obj.name} logs its "
                        "held-out reward metrics (eval_rewards/*) with data.val_fraction or data.val_path instead; "
                        "remove eval.metrics and score the adapter with `lora eval --data ROWS` after training")
    if r.train.kernels == "liger":  # auto never picks Liger for TRL's losses
        problems.append(f"train.kernels: liger is not wired for train.objective {obj.name}; set train.kernels: auto or none")
    return problems


def red_flags(r) -> list[tuple[str, str, str, str]]:
    """(key, problem, why, what to set) for settings of an objective that usually go wrong; lora
    check shows them beside its other findings."""
    obj, t = objective_of(r), r.train
    found = []
    if obj.lr_red_flag is not None and t.learning_rate > obj.lr_red_flag:
        found.append(("train.learning_rate", f"{t.learning_rate:g} is high for {obj.name}",
                      "preference tuning moves the policy fast: at SFT learning rates the likelihood of both "
                      "answers collapses and the adapter forgets how to answer",
                      f"train.learning_rate: 5e-6 to 5e-5 for {obj.name} with LoRA (at most {obj.lr_red_flag:g}; "
                      "tiny toy models are the exception)"))
    beta = obj.beta(r)
    if obj.reference and beta is not None and not 0.01 <= beta <= 1.0:
        found.append(("train.beta", f"{beta:g} is outside 0.01 to 1 for {obj.name}",
                      "a small beta lets the policy drift far from the reference (reward hacking, "
                      "degenerate text); a large one barely moves it",
                      "train.beta: 0.1 (0.05 to 0.5 is usual)"))
    if obj.rows == UNPAIRED and t.desirable_weight > 0 and t.undesirable_weight > 0:
        ratio = t.desirable_weight / t.undesirable_weight
        if not 0.25 <= ratio <= 4:
            found.append(("train.desirable_weight", f"desirable_weight / undesirable_weight = {ratio:.2g}",
                          "KTO works when (good rows x desirable_weight) / (bad rows x undesirable_weight) "
                          "lies between 1 and 4/3; a lopsided weight drowns one kind of answer",
                          "set the weights from the counts of good and bad rows"))
    return found
