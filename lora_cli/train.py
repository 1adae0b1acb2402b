"""`lora train`: set up in a fixed order (resume point, preflight, seed, tokenizer, data, model,
adapter, disk check, output folder, trainer), then hand the loop to the Hugging Face Trainer,
subclassed so that checkpoints are atomic and a run stops cleanly on a signal or a NaN.

Runs unchanged under `torchrun` / `accelerate launch`: every rank trains, only rank 0 prints
and writes (output folder, recipe, metrics, final adapter, plot)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from transformers import Trainer, TrainerCallback  # this module is imported only by commands that train

from lora_cli import checkpoint as ckpt
from lora_cli import preflight
from lora_cli.errors import LoraError
from lora_cli.model import RECIPE_FILE
from lora_cli.recipe import Recipe, dump_recipe

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
EXIT_NONFINITE = 3  # the run diverged; distinct from 2 (bad input) so scripts can tell them apart


@dataclass
class TrainResult:
    output_dir: Path
    trainable: int
    total: int
    data_summary: str
    final_loss: float | None = None
    steps: int = 0
    resumed_from: Path | None = None


class TrainingStopped(LoraError):
    """The run stopped before its last step (signal, non-finite loss, failed save)."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 2):
        super().__init__(message, hint)
        self.exit_code = exit_code


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch, or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


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
        resumable = ckpt.newest_complete(output_dir)
        also = f", or continue it from {resumable.name} with --resume" if resumable else ""
        raise LoraError(f"output_dir: {output_dir} already holds files from another run",
                        f"set another output_dir (e.g. --set output_dir=runs/new), pass --overwrite to replace that run{also}")
    if not (output_dir / RECIPE_FILE).is_file():
        raise LoraError(f"output_dir: {output_dir} is not empty and was not written by `lora train`; "
                        "--overwrite only replaces earlier lora runs",
                        "choose an empty or new output_dir")


def replace_output_dir(output_dir: Path) -> None:
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)


def resume_point(recipe: Recipe, resume: str) -> Path:
    """The checkpoint to continue from, after checking the run is the same one and unfinished."""
    output_dir = Path(recipe.output_dir)
    found = ckpt.resolve_resume(output_dir, resume)
    ckpt.check_same_run(output_dir / RECIPE_FILE, recipe.to_dict())
    if (output_dir / ckpt.FINAL_ADAPTER).is_file():
        raise LoraError(f"--resume: the run in {output_dir} already finished (its final adapter is there)",
                        "train further in a new run, e.g. --set output_dir=runs/next")
    return found


def prepare_resumed_dir(output_dir: Path, step: int) -> None:
    """Drop what the interrupted run wrote after the checkpoint: unfinished saves, and metrics
    of steps that will be trained again (so metrics.jsonl reads as one uninterrupted run)."""
    ckpt.clear_leftovers(output_dir)
    metrics = output_dir / METRICS_FILE
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = [json.dumps(r) for r in records
                if r.get("step", 0) <= step and "train_runtime" not in r]  # the stopped session's summary
        tmp = metrics.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, metrics)


# --------------------------------------------------------------------------- set-up steps

def _setup_precision(recipe: Recipe) -> dict:
    return preflight.precision_flags(recipe)


def training_arguments_kwargs(recipe: Recipe, output_dir: Path, precision: dict, has_eval: bool) -> dict:
    """Everything TrainingArguments gets, as a dict tests can read without building it."""
    import torch

    t = recipe.train
    save = {"save_strategy": "steps", "save_steps": t.save_steps} if t.save_steps else {"save_strategy": "epoch"}
    evaluate = {"eval_strategy": "no"}
    if has_eval:
        evaluate = ({"eval_strategy": "steps", "eval_steps": t.eval_steps} if t.eval_steps else {"eval_strategy": "epoch"})
        evaluate.update(per_device_eval_batch_size=t.batch_size,
                        prediction_loss_only=True)  # eval loss only: no vocab-sized logits gathered
    parallel = {}
    if t.fsdp:
        parallel["fsdp"] = t.fsdp
        if t.fsdp_config:
            parallel["fsdp_config"] = t.fsdp_config
    if t.deepspeed:
        parallel["deepspeed"] = t.deepspeed
    return dict(
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
        optim=t.optimizer,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must reach the guard and the log, not be averaged away
        save_total_limit=None,  # rotation is ours: it must count complete checkpoints only
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        ddp_find_unused_parameters=False,  # frozen base weights get no gradient by design
        seed=t.seed,
        data_seed=t.seed,
        report_to=list(t.report_to) or "none",
        disable_tqdm=True,  # our own rich progress instead
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # lets torchrun on CPU machines form a gloo DDP group
        **save,
        **evaluate,
        **parallel,
        **precision,
    )


def _setup_model(recipe: Recipe):
    from lora_cli.model import add_adapter, load_base_model

    from lora_cli.preflight import sharding_engine

    # QLoRA + FSDP / ZeRO-3: the packed 4-bit weights are stored in the model dtype so they shard
    model = load_base_model(recipe.model, sharded=sharding_engine(recipe) is not None)
    return add_adapter(model, recipe)


def _prepare_output_dir(recipe: Recipe, tokenizer, checkpoint: Path | None) -> None:
    """Rank 0 creates (or, resuming, tidies) output_dir while the other ranks wait."""
    import torch
    from accelerate import PartialState

    # Joins the process group under torchrun / accelerate launch (gloo on CPU, nccl on GPUs);
    # every rank has passed its read-only checks before this rendezvous.
    state = PartialState(cpu=not torch.cuda.is_available())
    output_dir = Path(recipe.output_dir)
    if state.is_main_process:
        if checkpoint is None:
            replace_output_dir(output_dir)
            # Written first so every checkpoint-N inside can be generated from or exported alone.
            (output_dir / RECIPE_FILE).write_text(dump_recipe(recipe), encoding="utf-8")
            tokenizer.save_pretrained(output_dir)
        else:
            prepare_resumed_dir(output_dir, ckpt.checkpoint_step(checkpoint))
    state.wait_for_everyone()  # no rank may write before rank 0 has prepared the folder


def _setup_trainer(recipe: Recipe, model, tokenizer, data, precision: dict, callbacks: list, resume_cmd: str):
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from lora_cli.data import configure_sampling, make_collator

    kwargs = training_arguments_kwargs(recipe, Path(recipe.output_dir), precision, data.eval is not None)
    trainer = SafeTrainer(
        model=model,
        args=configure_sampling(TrainingArguments(**kwargs), recipe.data),
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=make_collator(recipe.data, tokenizer),  # packed rows: position_ids, no cross-attention
        processing_class=tokenizer,
        callbacks=callbacks,
        keep_checkpoints=recipe.train.save_total_limit,
        resume_cmd=resume_cmd,
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; RichProgress shows them
    return trainer


def _check_disk(recipe: Recipe, model, planned_steps: int) -> None:
    t = recipe.train
    saves = planned_steps // t.save_steps if t.save_steps else math.ceil(max(t.epochs, 1))
    preflight.check_disk(Path(recipe.output_dir), preflight.trainable_bytes(model),
                         preflight.tokenizer_bytes(recipe.model.name_or_path),
                         t.save_total_limit, max(1, saves) + 1)  # +1: a save on interruption


# --------------------------------------------------------------------------- the run

def run_training(recipe: Recipe, *, dry_run: bool = False, overwrite: bool = False, resume: str | None = None,
                 recipe_path: str | Path | None = None, console: Console | None = None) -> TrainResult:
    console = (console or Console()) if is_main_process() else Console(quiet=True)
    output_dir = Path(recipe.output_dir)
    resume_cmd = f"lora train {recipe_path or '<recipe.yaml>'} --resume"
    if resume and (overwrite or dry_run):
        raise LoraError("--resume / --resume-from cannot be combined with --overwrite or --dry-run",
                        "--resume continues the run in output_dir; --overwrite starts it again")
    checkpoint = resume_point(recipe, resume) if resume else None
    if not dry_run and checkpoint is None:
        check_output_dir(output_dir, overwrite)
    precision = preflight.check_before_loading(recipe)  # fail in seconds, before loading anything

    from transformers import set_seed

    from lora_cli.data import build_sft_data
    from lora_cli.model import describe_adapted_modules, format_parameter_counts, load_tokenizer, parameter_counts

    set_seed(recipe.train.seed)
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
    if data.eval is not None:
        console.print(f"[bold]eval[/]    {len(data.eval)} held-out rows")
    _print_example(console, dataset, tokenizer)
    result = TrainResult(output_dir, trainable, total, stats.summary(), resumed_from=checkpoint)
    planned = _planned_steps(recipe, len(dataset))
    if dry_run:
        console.print(f"[bold]plan[/]    {planned} optimizer steps; would write to {output_dir}")
        console.print("dry run: nothing trained, nothing written")
        return result
    _check_disk(recipe, model, planned)

    _prepare_output_dir(recipe, tokenizer, checkpoint)
    if checkpoint is not None:
        console.print(f"[bold]resume[/]  from {checkpoint}")

    progress = RichProgress(console, output_dir / METRICS_FILE)
    guard = RunGuard(console)
    trainer = _setup_trainer(recipe, model, tokenizer, data, precision, [progress, guard], resume_cmd)
    guard.trainer = trainer
    with guard.catching_signals():
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    progress.close()
    guard.raise_if_stopped(output_dir, resume_cmd)

    result.final_loss = progress.last_loss
    result.steps = trainer.state.global_step
    if trainer.is_world_process_zero():
        save_final_adapter(model, output_dir)
        _write_plot(console, output_dir)
    console.print(f"adapter saved to {output_dir}  (try: lora generate --adapter {output_dir} \"...\")")
    return result


def save_final_adapter(model, output_dir: Path) -> None:
    """Write the adapter beside the staging area, then move it in with adapter_config.json last:
    that file marks the run finished, so a kill mid-save never leaves a finished-looking run
    with a truncated weights file."""
    staged = ckpt.staging_dir(output_dir) / "final"
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged, safe_serialization=True)
    files = sorted(staged.iterdir(), key=lambda f: f.name == ckpt.FINAL_ADAPTER)
    for f in files:
        os.replace(f, output_dir / f.name)
    shutil.rmtree(ckpt.staging_dir(output_dir), ignore_errors=True)


def _write_plot(console: Console, output_dir: Path) -> None:
    from lora_cli.plot import plot_losses

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        console.print("loss curve skipped: matplotlib is not installed (pip install matplotlib)")
        return
    written = plot_losses(output_dir / METRICS_FILE, output_dir / PLOT_FILE)
    if written:
        console.print(f"[bold]curve[/]   {written}")


def _planned_steps(recipe: Recipe, rows: int) -> int:
    if recipe.train.max_steps > 0:
        return recipe.train.max_steps
    batches = math.ceil(rows / (recipe.train.batch_size * preflight.world_size()))
    per_epoch = max(1, batches // recipe.train.gradient_accumulation)
    return math.ceil(per_epoch * recipe.train.epochs)


def _print_example(console: Console, dataset, tokenizer) -> None:
    """One decoded row with the masked parts dimmed, as the source workflow checks its second
    row; every masked and every supervised stretch (one each for alpaca, one per turn in a
    conversation, one per row in a pack) listed apart, joined by ' … '."""
    from rich.text import Text

    from lora_cli.data import label_runs
    from lora_cli.preview import highlighted

    example = dataset[1 if len(dataset) > 1 else 0]
    runs = label_runs(example)
    masked = " … ".join(repr(tokenizer.decode(ids)) for supervised, ids in runs if not supervised)
    answers = " … ".join(repr(tokenizer.decode(ids)) for supervised, ids in runs if supervised)
    console.print(Text("example ", style="bold") + highlighted(example, tokenizer))
    console.print(Text("masked (no loss): ", style="bold").append(masked))
    console.print(Text("supervised:       ", style="bold").append(answers))


# --------------------------------------------------------------------------- the trainer

class SafeTrainer(Trainer):
    """The Hugging Face Trainer with atomic checkpoints (staged, marked complete, renamed into
    place, rotated over complete ones only), a per-step non-finite loss flag, supervised-token
    throughput and perplexity in the logs."""

    def __init__(self, *args, keep_checkpoints: int | None = None, resume_cmd: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_checkpoints = keep_checkpoints
        self.resume_cmd = resume_cmd
        self.nonfinite = None        # device tensor: a micro-batch of this step had a NaN/inf loss
        self.poisoned = False        # set once the weights took a non-finite step: never save them
        self.last_saved_step = -1
        self._staging_root = None
        self._supervised = 0         # device tensor: supervised tokens since the last log
        self._last_log_time = time.time()

    # -- checkpoints

    def _get_output_dir(self, trial) -> str:
        if self._staging_root is not None:
            return str(self._staging_root)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        step = self.state.global_step
        if self.poisoned or step == self.last_saved_step:
            return
        output_dir = Path(self.args.output_dir)
        staging = ckpt.staging_dir(output_dir)
        self._staging_root = staging  # the Trainer writes checkpoint-N there, not in output_dir
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every rank's RNG state is in the staging folder
            if self.args.should_save:
                # A pickle of TrainingArguments that nothing reads (lora_recipe.yaml records the
                # settings); dropped so no checkpoint holds a .bin that invites an unsafe load.
                (staging / f"{ckpt.PREFIX}-{step}" / "training_args.bin").unlink(missing_ok=True)
                ckpt.publish(staging / f"{ckpt.PREFIX}-{step}", output_dir, step)
                ckpt.rotate(output_dir, self.keep_checkpoints)
        except (OSError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "writ" not in str(e):
                raise
            last = ckpt.newest_complete(output_dir)
            kept = f"the previous checkpoint {last} is intact" if last else "no earlier checkpoint exists"
            raise TrainingStopped(f"could not write the checkpoint of step {step}: {e}; {kept}",
                                  f"free disk space or fix the folder, then {self.resume_cmd}"
                                  if last else "free disk space or fix the folder, then start again") from None
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        self.last_saved_step = step

    # -- per-step bookkeeping

    def training_step(self, model, inputs, num_items_in_batch=None):
        import torch

        labels = inputs.get("labels")
        if labels is not None:  # kept on the device: no sync per micro-batch
            self._supervised = self._supervised + (labels != -100).sum()
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = ~torch.isfinite(loss.detach())
        self.nonfinite = bad if self.nonfinite is None else (self.nonfinite | bad)
        return loss

    def take_nonfinite(self) -> bool:
        flag, self.nonfinite = self.nonfinite, None
        return bool(flag) if flag is not None else False

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["supervised_tokens_per_s"] = round(self._tokens_per_second(), 1)
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 100.0))  # capped: no inf in JSON
        super().log(logs, start_time)

    def _tokens_per_second(self) -> float:
        import torch

        count = self._supervised if torch.is_tensor(self._supervised) else torch.tensor(self._supervised)
        count = self.accelerator.reduce(count.to(self.args.device), reduction="sum")  # all ranks log together
        now = time.time()
        rate = float(count) / max(now - self._last_log_time, 1e-6)
        self._supervised, self._last_log_time = 0, now
        return rate


class RunGuard(TrainerCallback):
    """Stops a run cleanly. On SIGINT / SIGTERM: finish the step, checkpoint, stop. On a
    non-finite loss: stop at once without saving, so the newest checkpoint stays the last good
    one. Ranks agree on both (one all-reduce per step), so no rank waits for another forever."""

    def __init__(self, console: Console):
        self.console = console
        self.trainer: SafeTrainer | None = None
        self.signal_received: int | None = None
        self.nonfinite_step: int | None = None
        self.stopped_at: int | None = None

    @contextmanager
    def catching_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum, frame):
        if self.signal_received is not None:  # asked twice: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.signal_received = signum
        self.console.print(f"\n{signal.Signals(signum).name} received: finishing this step and writing a "
                           "checkpoint (send it again to stop at once, without one)")

    def _agreed(self, args, flags: list[bool]) -> list[bool]:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return flags
        t = torch.tensor([int(f) for f in flags], device=args.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def on_step_end(self, args, state, control, **kwargs):
        signalled, nonfinite = self._agreed(args, [self.signal_received is not None, self.trainer.take_nonfinite()])
        if nonfinite:
            self.nonfinite_step = state.global_step
            self.trainer.poisoned = True
            control.should_save = False
            control.should_evaluate = False
            control.should_training_stop = True
        elif signalled:
            self.signal_received = self.signal_received or signal.SIGTERM  # another rank was signalled
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.nonfinite_step is not None:
            control.should_save = False
            control.should_evaluate = False
        return control

    def raise_if_stopped(self, output_dir: Path, resume_cmd: str) -> None:
        last = ckpt.newest_complete(output_dir)
        if self.nonfinite_step is not None:
            kept = (f"the last good checkpoint is {last} (usable: lora generate --adapter {last} \"...\")"
                    if last else "no checkpoint had been written yet (train.save_steps sets how often)")
            raise TrainingStopped(
                f"the training loss became non-finite (NaN or inf) at step {self.nonfinite_step}; "
                f"the run stopped without saving that step, and {kept}",
                "lower train.learning_rate, keep train.max_grad_norm > 0, prefer precision bf16 or fp32 to fp16, "
                "and check the data; then start again (--overwrite)", exit_code=EXIT_NONFINITE)
        if self.signal_received is not None and self.stopped_at is not None:  # else: it came after the last step
            name = signal.Signals(self.signal_received).name
            where = f"checkpoint written: {last}" if last else "no checkpoint could be written"
            raise TrainingStopped(f"stopped by {name} after step {self.stopped_at}; {where}",
                                  f"continue the run with: {resume_cmd}", exit_code=128 + self.signal_received)


class RichProgress(TrainerCallback):
    """A TrainerCallback drawing one progress bar with loss, learning rate, supervised tokens/s,
    eval loss and ETA, and appending every log to metrics.jsonl. Only the main process draws
    and writes."""

    def __init__(self, console: Console, metrics_file: Path):
        self.console = console
        self.metrics_file = metrics_file
        self.progress = None
        self.task = None
        self.last_loss: float | None = None
        self.info: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=self.console, transient=False)
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")
        self.progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            self.last_loss = float(logs["loss"])
            self.info["loss"] = f"loss {logs['loss']:.4f}"
            self.info["lr"] = f"lr {logs.get('learning_rate', 0):.2e}"
            if "supervised_tokens_per_s" in logs:
                self.info["tok"] = f"{logs['supervised_tokens_per_s']:,.0f} sup tok/s"
        if "eval_loss" in logs:
            self.info["eval"] = f"eval {logs['eval_loss']:.4f} (ppl {logs.get('eval_perplexity', float('nan')):.2f})"
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.metrics_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.progress:
            self.progress.update(self.task, info="  ".join(self.info.values()))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.update(self.task, completed=state.global_step)
        self.close()

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None
