"""`lora train`: set up in a fixed order (output, seed, tokenizer, data, model, adapter,
trainer), then hand the loop to the Hugging Face Trainer."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from transformers import TrainerCallback  # this module is imported only by commands that train

from lora_cli.errors import LoraError
from lora_cli.model import RECIPE_FILE
from lora_cli.recipe import Recipe, dump_recipe


@dataclass
class TrainResult:
    output_dir: Path
    trainable: int
    total: int
    data_summary: str
    final_loss: float | None = None
    steps: int = 0


# --------------------------------------------------------------------------- output folder

def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to write into a folder holding another run, unless told to replace it; never
    delete a folder that is not a lora run."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise LoraError(f"output_dir: {output_dir} exists and is not a folder", "choose another output_dir")
    if not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise LoraError(f"output_dir: {output_dir} already holds files from another run",
                        "set another output_dir (e.g. --set output_dir=runs/new), or pass --overwrite to replace that run")
    if not (output_dir / RECIPE_FILE).is_file():
        raise LoraError(f"output_dir: {output_dir} is not empty and was not written by `lora train`; "
                        "--overwrite only replaces earlier lora runs",
                        "choose an empty or new output_dir")


def replace_output_dir(output_dir: Path) -> None:
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)


# --------------------------------------------------------------------------- set-up steps

def _setup_precision(recipe: Recipe) -> dict:
    """TrainingArguments' bf16/fp16 flags, refusing combinations the hardware cannot run."""
    import torch

    want = recipe.train.precision
    cuda = torch.cuda.is_available()
    if want == "auto":
        want = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if want == "fp16" and not cuda:
        raise LoraError("train.precision: fp16 needs a CUDA GPU; this machine has none", "use precision: fp32 (or auto) on CPU")
    if want == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise LoraError("train.precision: bf16 is not supported by this GPU", "use precision: fp16 (or auto)")
    return {"bf16": want == "bf16", "fp16": want == "fp16"}


def _setup_training_args(recipe: Recipe, output_dir: Path):
    import torch
    from transformers import TrainingArguments

    t = recipe.train
    save = {"save_strategy": "steps", "save_steps": t.save_steps} if t.save_steps else {"save_strategy": "epoch"}
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_total_limit=t.save_total_limit,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        disable_tqdm=True,  # our own rich progress instead
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        **save,
        **_setup_precision(recipe),
    )


def _setup_model(recipe: Recipe):
    from lora_cli.model import add_adapter, load_base_model

    model = load_base_model(recipe.model)
    return add_adapter(model, recipe)


# --------------------------------------------------------------------------- the run

def run_training(recipe: Recipe, *, dry_run: bool = False, overwrite: bool = False,
                 console: Console | None = None) -> TrainResult:
    console = console or Console()
    output_dir = Path(recipe.output_dir)
    if not dry_run:
        check_output_dir(output_dir, overwrite)

    from transformers import set_seed

    from lora_cli.data import build_sft_data, configure_sampling, describe_example, make_collator
    from lora_cli.model import describe_adapted_modules, format_parameter_counts, load_tokenizer, parameter_counts

    set_seed(recipe.train.seed)
    precision = _setup_precision(recipe)  # fail on impossible precision before loading anything
    tokenizer = load_tokenizer(recipe.model.name_or_path, recipe.model.trust_remote_code)
    data = build_sft_data(recipe.data, tokenizer)
    dataset, stats = data.train, data.stats
    model = _setup_model(recipe)
    trainable, total = parameter_counts(model)

    console.print(f"[bold]base[/]    {recipe.model.name_or_path} (quantization: {recipe.model.quantization}, "
                  f"precision: {'bf16' if precision['bf16'] else 'fp16' if precision['fp16'] else 'fp32'})")
    console.print(f"[bold]adapter[/] {format_parameter_counts(trainable, total)}")
    console.print(f"[bold]wrapped[/] {describe_adapted_modules(model)}")
    console.print(f"[bold]data[/]    {recipe.data.path}: {stats.summary()}")
    _print_example(console, dataset, tokenizer, describe_example)
    result = TrainResult(output_dir, trainable, total, stats.summary())
    if dry_run:
        steps = _planned_steps(recipe, len(dataset))
        console.print(f"[bold]plan[/]    {steps} optimizer steps; would write to {output_dir}")
        console.print("dry run: nothing trained, nothing written")
        return result

    replace_output_dir(output_dir)
    # Written first so every checkpoint-N inside can be generated from or exported alone.
    (output_dir / RECIPE_FILE).write_text(dump_recipe(recipe), encoding="utf-8")
    tokenizer.save_pretrained(output_dir)

    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    progress = RichProgress(console, output_dir / "metrics.jsonl")
    trainer = Trainer(
        model=model,
        args=configure_sampling(_setup_training_args(recipe, output_dir), recipe.data),
        train_dataset=dataset,
        data_collator=make_collator(recipe.data, tokenizer),  # packed rows: position_ids, no cross-attention
        processing_class=tokenizer,
        callbacks=[progress],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; RichProgress shows them
    trainer.train()
    if trainer.is_world_process_zero():
        model.save_pretrained(output_dir, safe_serialization=True)
    result.final_loss = progress.last_loss
    result.steps = trainer.state.global_step
    console.print(f"adapter saved to {output_dir}  (try: lora generate --adapter {output_dir} \"...\")")
    return result


def _planned_steps(recipe: Recipe, rows: int) -> int:
    import math

    if recipe.train.max_steps > 0:
        return recipe.train.max_steps
    per_epoch = max(1, math.ceil(rows / recipe.train.batch_size) // recipe.train.gradient_accumulation)
    return math.ceil(per_epoch * recipe.train.epochs)


def _print_example(console: Console, dataset, tokenizer, describe) -> None:
    """One decoded row with the masked prompt dimmed, as the source workflow checks its second row."""
    from rich.text import Text

    example = dataset[1 if len(dataset) > 1 else 0]
    whole, supervised = describe(example, tokenizer)
    prompt_len = sum(1 for t in example["labels"] if t == -100)
    prompt_text = tokenizer.decode(example["input_ids"][:prompt_len])
    text = Text("example ", style="bold")
    text.append(prompt_text, style="dim")
    text.append(tokenizer.decode(example["input_ids"][prompt_len:]), style="green")
    console.print(text)
    console.print(Text("masked (no loss): ", style="bold").append(repr(prompt_text)))
    console.print(Text("supervised:       ", style="bold").append(repr(supervised)))


class RichProgress(TrainerCallback):
    """A TrainerCallback drawing one progress bar with loss and learning rate, and appending
    every log to metrics.jsonl. Only the main process draws and writes."""

    def __init__(self, console: Console, metrics_file: Path):
        self.console = console
        self.metrics_file = metrics_file
        self.progress = None
        self.task = None
        self.last_loss: float | None = None
        self.started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.started = time.time()
        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"), console=self.console, transient=False)
        self.task = self.progress.add_task("train", total=state.max_steps, info="")
        self.progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            self.last_loss = float(logs["loss"])
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.metrics_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.progress and "loss" in logs:
            self.progress.update(self.task, info=f"loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()
            self.progress = None
