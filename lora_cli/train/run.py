"""`lora train`: set up in a fixed order (inputs apart from output_dir, resume point, preflight,
seed, tokenizer, data, model, adapter, disk check, output folder under its lock, trainer), then
hand the loop to the Hugging Face Trainer. Its public hooks make checkpoints atomic (it writes
into a staging folder through TrainingArguments.output_dir; on_save publishes) and stop a run
cleanly on a signal or a NaN.

Runs unchanged under `torchrun` / `accelerate launch`: every rank trains, only rank 0 prints
and writes (output folder, recipe, metrics, final adapter, plot)."""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from lora_cli.files import atomic, ownership
from lora_cli.train import checkpoint as ckpt, preflight
from lora_cli.errors import LoraError
from lora_cli.model.adapter_folder import ADAPTER_WEIGHTS, RECIPE_FILE, verify_adapter
from lora_cli.train.objectives import objective_of
from lora_cli.tasks import bind_tokenizer, get_task, hooks
from lora_cli.train.metrics import METRICS_FILE, plot_losses, read_metrics
from lora_cli.recipe.schema import Recipe, dump_recipe
from lora_cli.data.sources import data_paths
from lora_cli.data.batching import batch_layout, batch_shape, groups_by_length
from lora_cli.model.kernels import choose_liger, free_memory, RunKernels
from lora_cli.model.adapters import add_adapter, describe_adapted_modules
from lora_cli.model import load as model_load  # looked up at call time: tests stand in for these
from lora_cli.model.load import (device_facts, format_parameter_counts, load_base_model,
                                 parameter_counts)
from lora_cli.train.preflight import sharding_engine
from lora_cli.data.examples import configure_sampling, label_runs
from lora_cli.train.preference import (build_preference_data, example_lines as preference_example, finished_model,
                                       reference_description, setup_trainer)
from lora_cli.train.estimate import sized_tokens_per_batch
from lora_cli.eval.metrics import resolve_metrics
from lora_cli.eval.run import evaluate_trained
from lora_cli.libraries import install_hint
from lora_cli.train.preview import highlighted
from lora_cli.train.callbacks import AtomicCheckpoints, RichProgress, RunGuard, SafeTrainer, TrainingStopped
from lora_cli.train.output_dir import is_main_process, refuse_output_dir

PLOT_FILE = "loss.png"


@dataclass
class TrainResult:
    output_dir: Path
    trainable: int
    total: int
    data_summary: str
    final_loss: float | None = None
    steps: int = 0
    resumed_from: Path | None = None
    eval_metrics: dict = field(default_factory=dict)  # eval.metrics on the validation split: {name: {value, low, high}}


def saved_recipe_resume_command(output_dir: Path) -> str:
    """The command that resumes this very run: its own saved recipe holds every --set override."""
    return shlex.join(["lora", "train", str(Path(output_dir) / RECIPE_FILE), "--resume"])  # pasted into a shell as is


def checkpointing_arguments(enabled: bool) -> dict:
    """TrainingArguments for activation checkpointing under the name the installed transformers
    reads: it renamed gradient_checkpointing to activation_checkpointing, the old name going in v6."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def resume_point(recipe: Recipe, resume: ckpt.Resume) -> Path:
    """The checkpoint to continue from, after checking the run is the same one and unfinished."""
    output_dir = Path(recipe.output_dir)
    found = ckpt.resolve_resume(output_dir, resume)
    verify_adapter(found)  # a damaged checkpoint is refused before anything loads it
    if ckpt.run_finished(output_dir):  # before the recipe check: its hint would offer --resume again
        raise LoraError(f"--resume: the run in {output_dir} already finished (its final adapter is there)",
                        "train further in a new run, e.g. --set output_dir=runs/next")
    ckpt.verify_resumable(found)  # a lost optimizer or a pickle that is more than tensors, too
    ckpt.check_same_run(output_dir / RECIPE_FILE, recipe.to_dict())
    return found


def prepare_resumed_dir(output_dir: Path, step: int) -> None:
    """Drop what the interrupted run wrote after the checkpoint: unfinished saves, and metrics
    of steps that will be trained again (so metrics.jsonl reads as one uninterrupted run)."""
    ckpt.clear_leftovers(output_dir)
    metrics = output_dir / METRICS_FILE
    if metrics.is_file():
        records = read_metrics(metrics)
        kept = [json.dumps(r) for r in records
                if r.get("step", 0) <= step and "train_runtime" not in r]  # the stopped session's summary
        atomic.write_text(metrics, "".join(line + "\n" for line in kept))


# --------------------------------------------------------------------------- set-up steps

def training_arguments_kwargs(recipe: Recipe, output_dir: Path, precision: dict, has_eval: bool,
                              chosen=None) -> dict:
    """Everything TrainingArguments gets, as a dict tests can read without building it.
    chosen: the run's lora_cli.model.kernels.RunKernels (Liger, token budget)."""
    import torch

    t = recipe.train
    chosen = chosen or RunKernels(liger=t.kernels == "liger")
    shape = batch_shape(t, recipe.data.max_length, chosen.tokens_per_batch)
    save = {"save_strategy": "steps", "save_steps": t.save_steps} if t.save_steps else {"save_strategy": "epoch"}
    evaluate = {"eval_strategy": "no"}
    if has_eval:
        evaluate = ({"eval_strategy": "steps", "eval_steps": t.eval_steps} if t.eval_steps else {"eval_strategy": "epoch"})

        # A causal LM's eval is its loss only (no vocab-sized logits gathered); a classifier's
        # logits are small and give accuracy and macro-F1.
        evaluate.update(per_device_eval_batch_size=shape.batch_size,
                        prediction_loss_only=not hooks.of(recipe.model.task).eval_gathers_predictions(recipe))
    parallel = {}
    if t.fsdp:
        parallel["fsdp"] = t.fsdp
        if t.fsdp_config:
            parallel["fsdp_config"] = t.fsdp_config
    if t.deepspeed:
        parallel["deepspeed"] = t.deepspeed
    return dict(
        output_dir=str(ckpt.staging_dir(output_dir)),  # checkpoints are staged; on_save publishes them
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=shape.batch_size,
        gradient_accumulation_steps=shape.gradient_accumulation,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must reach the guard and the log, not be averaged away
        save_total_limit=None,  # rotation is ours: it must count complete checkpoints only
        **checkpointing_arguments(t.gradient_checkpointing),
        use_liger_kernel=chosen.liger,  # the Trainer patches the model with Liger's kernels
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


def _setup_model(recipe: Recipe, tokenizer):
    # QLoRA + FSDP / ZeRO-3: the packed 4-bit weights are stored in the model dtype so they shard
    model = load_base_model(recipe.model, sharded=sharding_engine(recipe) is not None, training=True)
    bind_tokenizer(model, tokenizer)
    return add_adapter(model, recipe)


def _prepare_output_dir(recipe: Recipe, tokenizer, checkpoint: Path | None, lock: ownership.FolderLock,
                        data_record: dict) -> None:
    """Rank 0 takes the folder's lock, then creates (or, resuming, tidies) output_dir while the
    other ranks wait."""
    import torch
    from accelerate import PartialState

    # Joins the process group under torchrun / accelerate launch (gloo on CPU, nccl on GPUs);
    # every rank has passed its read-only checks before this rendezvous.
    state = PartialState(cpu=not torch.cuda.is_available())
    output_dir = Path(recipe.output_dir)
    if state.is_main_process:
        lock.acquire()  # held until the run ends: a second run on this folder is refused
        if checkpoint is None:
            ownership.clear_claimed(output_dir, "train", keep=ownership.RUN_LOCK_FILES)  # --overwrite
            ownership.claim(output_dir, "train", [ownership.LOCK_FILE, RECIPE_FILE, METRICS_FILE, ckpt.DATA_FILE])
            # Written first so every checkpoint-N inside can be generated from or exported alone.
            atomic.write_text(output_dir / RECIPE_FILE, dump_recipe(recipe))
            atomic.write_text(output_dir / ckpt.DATA_FILE, json.dumps(data_record, indent=1))
            staged = ckpt.staging_dir(output_dir) / "tokenizer"
            tokenizer.save_pretrained(staged)
            install_files(staged, output_dir)
        else:
            prepare_resumed_dir(output_dir, ckpt.checkpoint_step(checkpoint))
    state.wait_for_everyone()  # no rank may write before rank 0 has prepared the folder


def install_files(staged: Path, output_dir: Path, last: str | None = None) -> None:
    """Claim the files of a staged folder for the run, then move them into output_dir."""
    ownership.claim(output_dir, "train", [f.name for f in staged.iterdir()])
    atomic.move_files_into(staged, output_dir, last=last)
    try:
        staged.parent.rmdir()
    except OSError:
        pass


def _setup_trainer(recipe: Recipe, model, tokenizer, data, precision: dict, callbacks: list,
                   carried_loss: dict | None, chosen=None):
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    kwargs = training_arguments_kwargs(recipe, Path(recipe.output_dir), precision, data.eval is not None, chosen)
    if objective_of(recipe).preference:  # TRL's trainer, collator and loss; our callbacks and guards

        return setup_trainer(recipe, model, tokenizer, data, kwargs, callbacks, carried_loss, SafeTrainer)
    layout, grouped = _setup_batching(recipe, model, chosen)
    task_hooks = hooks.of(recipe.model.task)
    trainer = SafeTrainer(
        model=model,
        args=configure_sampling(TrainingArguments(**kwargs), grouped),
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=task_hooks.make_collator(recipe, layout, tokenizer),  # flattened / packed rows: no cross-attention
        processing_class=tokenizer,
        callbacks=callbacks,
        carried_loss=carried_loss,
        **task_hooks.trainer_kwargs(recipe, data),  # classification: accuracy and macro-F1 at every eval
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; RichProgress shows them
    return trainer


def _setup_batching(recipe: Recipe, model, chosen=None) -> tuple[str, bool]:
    """(batch layout, length-grouped?) for the attention kernel the loaded model runs."""
    # through the module, so tests can stand in for what the kernel reports (test_batching)
    budget = chosen.tokens_per_batch if chosen else None
    layout = batch_layout(recipe, model_load.attention_in_use(model), model_load.masks_from_positions(model), budget)
    return layout, groups_by_length(recipe.data, layout, batch_shape(recipe.train, recipe.data.max_length, budget))


def describe_batching(recipe: Recipe, model, chosen=None) -> str:
    """The `batches` line: shape, layout, attention kernel, fused kernels, token budget."""

    chosen = chosen or RunKernels(liger=recipe.train.kernels == "liger")
    shape = batch_shape(recipe.train, recipe.data.max_length, chosen.tokens_per_batch)
    objective = objective_of(recipe)
    if objective.preference:  # TRL pads each batch's rows; a pair is two sequences in one forward pass
        per_row = f"{objective.sequences_per_row} sequences per row, " if objective.sequences_per_row > 1 else ""
        return f"{shape.describe()}, {per_row}padded rows, attention {model_load.attention_in_use(model)}"
    layout, grouped = _setup_batching(recipe, model, chosen)
    return (f"{shape.describe()}, {layout} rows{', length-grouped' if grouped else ''}, "
            f"attention {model_load.attention_in_use(model)}, {chosen.describe()}")


def _choose_kernels(recipe: Recipe, model):
    """The run's lora_cli.model.kernels choices on this machine, once the model is loaded (its weights
    are then out of the free memory the token budget is sized from)."""

    free = free_memory()
    facts = device_facts(recipe.model, free)
    # Liger patches a causal LM's SFT loss; TRL's preference trainers compute their own
    fused_loss_applies = get_task(recipe.model.task).token_stream and not objective_of(recipe).preference
    return RunKernels(liger=choose_liger(recipe.train.kernels, facts, fused_loss_applies),
                      tokens_per_batch=sized_tokens_per_batch(recipe, model, facts), free_bytes=free)


def _check_disk(recipe: Recipe, model, planned_steps: int) -> None:
    t = recipe.train
    saves = planned_steps // t.save_steps if t.save_steps else math.ceil(max(t.epochs, 1))
    preflight.check_disk(Path(recipe.output_dir), preflight.trainable_bytes(model),
                         preflight.tokenizer_bytes(recipe.model.name_or_path),
                         t.save_total_limit, max(1, saves) + 1)  # +1: a save on interruption


# --------------------------------------------------------------------------- the run

def run_training(recipe: Recipe, *, dry_run: bool = False, overwrite: bool = False, resume: ckpt.Resume | None = None,
                 recipe_path: str | Path | None = None, console: Console | None = None,
                 callbacks: list | None = None) -> TrainResult:
    """callbacks: extra TrainerCallbacks (bench/bench_gpu.py times steps with one)."""
    console = (console or Console()) if is_main_process() else Console(quiet=True)

    refuse_output_dir(recipe, dry_run=dry_run, overwrite=overwrite, resume=resume, recipe_path=recipe_path)
    hooks.prepare_recipe(recipe)  # e.g. the label set read from the data: saved with the run, compared on resume
    output_dir = Path(recipe.output_dir)
    resume_cmd = saved_recipe_resume_command(output_dir)
    checkpoint = resume_point(recipe, resume) if resume is not None else None
    precision = preflight.check_before_loading(recipe)  # fail in seconds, before loading anything

    resolve_metrics(recipe.eval.metrics, "eval.metrics")  # a user's module:function imports now, not after training

    from transformers import set_seed

    set_seed(recipe.train.seed)
    tokenizer = model_load.load_tokenizer(recipe.model.name_or_path, recipe.model.trust_remote_code)
    objective = objective_of(recipe)
    task_hooks = hooks.of(recipe.model.task)  # data, plan lines, held-out report: the task's own module
    if objective.preference:  # pairs or labelled answers, tokenised through the same template path

        data = build_preference_data(recipe, tokenizer)
    else:
        data = task_hooks.build_data(recipe, tokenizer)
    dataset, stats = data.train, data.stats
    data_record = None if dry_run else ckpt.data_fingerprint(recipe.data, data)
    if checkpoint is not None:
        ckpt.check_same_data(output_dir, data_record)
    model = _setup_model(recipe, tokenizer)
    trainable, total = parameter_counts(model)
    chosen = _choose_kernels(recipe, model)  # Liger, token budget: after loading, from the free memory

    console.print(f"[bold]base[/]    {recipe.model.name_or_path} (quantization: {recipe.model.quantization}, "
                  f"precision: {'bf16' if precision['bf16'] else 'fp16' if precision['fp16'] else 'fp32'})")
    console.print(f"[bold]adapter[/] {format_parameter_counts(trainable, total)}")
    console.print(f"[bold]wrapped[/] {describe_adapted_modules(model)}")
    console.print(f"[bold]data[/]    {recipe.data.path}: {stats.summary()}")
    console.print(f"[bold]batches[/] {describe_batching(recipe, model, chosen)}")
    if objective.preference:

        reference = reference_description(recipe)
        settings = ", ".join(f"{k} {','.join(v) if isinstance(v, list) else v}"
                             for k, v in objective.config_kwargs(recipe).items())
        console.print(f"[bold]objective[/] {objective.name} ({settings}); "
                      f"reference: {reference if objective.reference else 'none (reference-free)'}", highlight=False)
    if data.eval is not None:
        console.print(f"[bold]eval[/]    {len(data.eval)} held-out rows")
    for line in task_hooks.data_report_lines(recipe, data):  # classification: class balance
        console.print(line, highlight=False, markup=False)
    if objective.preference:

        example = preference_example(recipe, dataset, tokenizer)
    else:
        example = task_hooks.example_lines(recipe, dataset, tokenizer)
    if example is None:
        _print_example(console, dataset, tokenizer)
    for line in example or []:
        console.print(line, highlight=False, markup=False)
    result = TrainResult(output_dir, trainable, total, stats.summary(), resumed_from=checkpoint)
    planned = preflight.planned_steps(recipe, len(dataset))
    if dry_run:
        task_hooks.report_held_out(recipe, model, tokenizer, console, "base on the eval split (before training)")
        console.print(f"[bold]plan[/]    {planned} optimizer steps; would write to {output_dir}")
        console.print("dry run: nothing trained, nothing written")
        return result
    _check_disk(recipe, model, planned)

    lock = ownership.FolderLock(output_dir)
    try:
        with ownership.turning_disk_errors(output_dir, "output_dir"):
            _prepare_output_dir(recipe, tokenizer, checkpoint, lock, data_record)
        if checkpoint is not None:
            console.print(f"[bold]resume[/]  from {checkpoint}")
        _train(recipe, model, tokenizer, data, precision, checkpoint, console, resume_cmd, result, chosen, callbacks)
    finally:
        lock.release()
    local_rows = [p for p in data_paths(recipe.data.path) if os.path.isfile(p)]
    hint = get_task(recipe.model.task).next_step(output_dir, local_rows[0] if local_rows else None)
    console.print(f"adapter saved to {output_dir}  (try: {hint})")
    if is_main_process():
        _write_plot(console, output_dir)  # after the summary: matplotlib's import never delays it
    return result


def _train(recipe: Recipe, model, tokenizer, data, precision: dict, checkpoint: Path | None, console: Console,
           resume_cmd: str, result: TrainResult, chosen=None, callbacks: list | None = None) -> None:
    """The loop, then the final adapter, written once (no checkpoint is taken at the last step)."""

    output_dir = Path(recipe.output_dir)
    progress = RichProgress(console, output_dir / METRICS_FILE)
    guard = RunGuard(console)
    saver = AtomicCheckpoints(output_dir, recipe.train.save_total_limit)
    carried = ckpt.loss_window(checkpoint) if checkpoint is not None else None
    trainer = _setup_trainer(recipe, model, tokenizer, data, precision, [progress, guard, saver, *(callbacks or [])],
                             carried, chosen)
    guard.trainer = saver.trainer = trainer
    _leave_process_group_at_exit()
    try:
        with guard.catching_signals():
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except LoraError:
        raise
    except Exception as e:  # a library's own error type may carry a full or read-only disk
        fault = ownership.disk_fault(output_dir / METRICS_FILE, e)
        if isinstance(e, (OSError, RuntimeError)) or fault is not None:
            saver.raise_if_save_failed(e, resume_cmd)
        if fault is None:
            raise
        last = ckpt.newest_complete(output_dir)
        raise TrainingStopped(f"could not write to {output_dir}: {ownership.fault_text(fault)}"
                              + (f"; {last} is intact" if last else ""),
                              f"free disk space or fix the folder, then {resume_cmd}" if last else
                              "free disk space or fix the folder, then start again with --overwrite") from None
    finally:
        progress.close()
    guard.raise_if_stopped(output_dir, resume_cmd)

    result.final_loss = progress.last_loss
    result.steps = trainer.state.global_step
    if trainer.is_world_process_zero():
        hooks.of(recipe.model.task).report_held_out(recipe, model, tokenizer, console, "eval split after training",
                                                    output_file=output_dir / hooks.EVAL_REPORT_FILE)
        try:

            save_final_adapter(finished_model(model), output_dir)
        except OSError as e:
            last = ckpt.newest_complete(output_dir)
            raise TrainingStopped(f"could not write the final adapter to {output_dir}: {ownership.fault_text(e)}; nothing partial was "
                                  f"left" + (f", and {last} is intact" if last else ""),
                                  f"free disk space, then {resume_cmd}" if last else
                                  "free disk space, then start again with --overwrite") from None
        _evaluate_generation(recipe, model, tokenizer, console, result)  # after the save: a failure here loses nothing


def _evaluate_generation(recipe: Recipe, model, tokenizer, console: Console, result: TrainResult) -> None:
    """eval.metrics on the validation split (evaluate.py, `lora eval`'s scoring): printed,
    appended to metrics.jsonl as one record at the final step, kept in the run's result."""
    if not recipe.eval.metrics:
        return

    scores = evaluate_trained(recipe, model, tokenizer, log=lambda line: console.print(line, highlight=False))
    if not scores:
        return
    result.eval_metrics = scores
    record = {"step": result.steps, **{f"eval_{name}": s["value"] for name, s in scores.items()},
              **{f"eval_{name}_interval": [s["low"], s["high"]] for name, s in scores.items()}}
    with open(Path(recipe.output_dir) / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    for name, s in scores.items():
        console.print(f"[bold]eval[/]    {name} {s['value']:.4g} [{s['low']:.4g}, {s['high']:.4g}] on the validation split",
                      highlight=False)


def _leave_process_group_at_exit() -> None:
    """Destroy the process group (if any) before the interpreter starts tearing down: a rank
    that exits with it still open can die of SIGABRT while gloo's threads are destroyed
    ("terminate called without an active exception", pytorch issue 190489), failing a run that
    trained. At exit rather than after this run, so a sweep's next trial still has its peers."""
    import atexit

    atexit.unregister(_destroy_process_group)  # once, however many runs this process makes
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    from accelerate import PartialState

    PartialState().destroy_process_group()


def save_final_adapter(model, output_dir: Path) -> None:
    """Write the adapter beside the staging area, then move it in with adapter_config.json last:
    that file marks the run finished, so a kill mid-save never leaves a finished-looking run
    with a truncated weights file."""
    staged = ckpt.staging_dir(output_dir) / "final"
    shutil.rmtree(staged, ignore_errors=True)
    try:
        model.save_pretrained(staged, safe_serialization=True)
        install_files(staged, output_dir, last=ckpt.FINAL_ADAPTER)
    except Exception as e:  # safetensors reports a full disk in its own error type
        fault = ownership.disk_fault(staged / ADAPTER_WEIGHTS, e)  # judged before the partial files go
        if fault is None:
            raise
        raise fault from None
    finally:
        shutil.rmtree(ckpt.staging_dir(output_dir), ignore_errors=True)


def _write_plot(console: Console, output_dir: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:

        console.print(f"loss curve skipped: matplotlib is not installed ({install_hint('plot')})")
        return
    with ownership.turning_disk_errors(output_dir / PLOT_FILE, "output_dir"):
        ownership.claim(output_dir, "train", [PLOT_FILE])
        written = plot_losses(output_dir / METRICS_FILE, output_dir / PLOT_FILE)
    if written:
        console.print(f"[bold]curve[/]   {written}")


def _print_example(console: Console, dataset, tokenizer) -> None:
    """One decoded row with the masked parts dimmed, as the source workflow checks its second
    row; every masked and every supervised stretch (one each for alpaca, one per turn in a
    conversation, one per row in a pack) listed apart, joined by ' … '."""
    from rich.text import Text

    example = dataset[1 if len(dataset) > 1 else 0]
    runs = label_runs(example)
    masked = " … ".join(repr(tokenizer.decode(ids)) for supervised, ids in runs if not supervised)
    answers = " … ".join(repr(tokenizer.decode(ids)) for supervised, ids in runs if supervised)
    console.print(Text("example ", style="bold") + highlighted(example, tokenizer))
    console.print(Text("masked (no loss): ", style="bold").append(masked))
    console.print(Text("supervised:       ", style="bold").append(answers))
