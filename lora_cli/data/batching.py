"""How a recipe's rows become batches: the batch shape (rows per forward pass, forward passes
per optimizer step) and the layout of a batch (flattened padding-free, packed, or padded).

One home for these rules, read by training, the estimate, the lint and the data preview.
A key the recipe leaves empty is chosen here for speed; a key it writes is obeyed exactly, so
`packing: false, batch_size: 1, gradient_accumulation: 8` is the source workflow, unchanged.
No torch import: the estimate and `lora check` read these rules too.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_cli.model.methods import method_of
from lora_cli.tasks import get_task

# Rows per optimizer step when the recipe sets neither batch_size nor gradient_accumulation:
# the source workflow's batch 1 x accumulation 8, so the default optimises the same objective
# at the same step size and only the shape of the work changes.
STEP_ROWS = 8
OLD_BATCH_SIZE, OLD_ACCUMULATION = 1, 8  # what an unset key meant before the batch shape was chosen

# Attention kernels that take several sequences in one row without a dense mask (variable-length
# attention from cu_seq_lens / restarted position_ids; flex attention's block mask built from them). sdpa and eager honour restarted
# position_ids too (in models whose mask comes from masking_utils), through a dense
# block-diagonal mask over the flattened row: worth it while the row is one forward pass of
# the chosen shape (at most train.tokens_per_batch tokens, so the mask stays small).
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")  # flex: a block mask from positions

FLATTENED = "flattened"  # each batch concatenated into one row, positions restart per example
PACKED = "packed"        # rows are best-fit packs of examples (data.packing: true)
PADDED = "padded"        # one example per row, right-padded to the batch's longest


@dataclass(frozen=True)
class BatchShape:
    batch_size: int              # rows per device per forward pass
    gradient_accumulation: int   # forward passes per optimizer step
    chosen: bool                 # True when picked from train.tokens_per_batch (both keys empty)

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation

    def describe(self) -> str:
        how = " (from train.tokens_per_batch)" if self.chosen else ""
        return f"batch {self.batch_size} x accumulation {self.gradient_accumulation}{how}"


DEFAULT_TOKENS_PER_BATCH = 4096  # train.tokens_per_batch left empty, off a CUDA GPU (lora_cli.model.kernels sizes it on one)


def batch_shape(train_cfg, max_length: int, tokens_per_batch: int | None = None) -> BatchShape:
    """Both keys empty: the largest power of two rows (1 to STEP_ROWS) whose max_length-long rows
    fit the token budget, and enough forward passes to make STEP_ROWS rows per step. A power of
    two divides STEP_ROWS, so the step size never changes with the budget. One key set: the
    other keeps the meaning it always had (batch 1, accumulation 8). tokens_per_batch: the budget
    sized for this card (lora_cli.model.kernels), when the recipe leaves train.tokens_per_batch empty."""
    batch, accumulation = train_cfg.batch_size, train_cfg.gradient_accumulation
    if batch is None and accumulation is None:
        budget = train_cfg.tokens_per_batch or tokens_per_batch or DEFAULT_TOKENS_PER_BATCH
        fits = max(1, budget // max_length)
        batch = 1
        while batch * 2 <= min(fits, STEP_ROWS):
            batch *= 2
        return BatchShape(batch, STEP_ROWS // batch, chosen=True)
    return BatchShape(batch if batch is not None else OLD_BATCH_SIZE,
                      accumulation if accumulation is not None else OLD_ACCUMULATION, chosen=False)


def batch_layout(recipe, attn_implementation: str | None, masks_from_positions: bool = False,
                 tokens_per_batch: int | None = None) -> str:
    """FLATTENED, PACKED or PADDED for this recipe and the attention kernel the model runs.
    Variable-length kernels flatten packs too: they read restarted positions only in a batch of
    one row, so packs side by side in a batch would attend across their examples.
    masks_from_positions (model.masks_from_positions): the model masks a flattened row's
    examples apart under sdpa / eager as well, so a default recipe (packing and batch shape
    left empty) flattens there too: no padding and, unlike length-grouped rows, the examples
    of a step are the random ones the source workflow's steps hold (the same loss, measured)."""
    data_cfg = recipe.data
    if not get_task(recipe.model.task).token_stream:
        return PADDED  # classification and seq2seq rows are padded by their task's collator (tasks.make_collator)
    if method_of(recipe).learns_virtual_tokens:
        # peft drops position_ids for methods that put virtual tokens before the input, so examples
        # sharing a row would attend to each other (packing: true is refused for them in recipe.py)
        return PADDED
    if attn_implementation in VARLEN_ATTENTION and data_cfg.packing is not False:
        return FLATTENED
    if data_cfg.packing:
        return PACKED
    if (data_cfg.packing is None and masks_from_positions and attn_implementation in ("sdpa", "eager")
            and batch_shape(recipe.train, data_cfg.max_length, tokens_per_batch).chosen):
        return FLATTENED
    return PADDED


def groups_by_length(data_cfg, layout: str, shape: BatchShape) -> bool:
    """Length-grouped sampling: as the recipe says, else on where it saves padding (padded rows,
    several per forward pass). Never on by default for a shape the recipe wrote, so an explicit
    old recipe keeps its old (random) order."""
    if data_cfg.group_by_length is not None:
        return data_cfg.group_by_length
    return layout == PADDED and shape.batch_size > 1 and shape.chosen
