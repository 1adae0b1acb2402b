"""The Hugging Face Trainer as `lora train` runs it: SafeTrainer (a per-step non-finite flag,
supervised tokens/s, perplexity, a loss window that survives a resume) and the callbacks
handed to it, each through the Trainer's public hooks: RunGuard (stop cleanly on a signal or a
NaN), AtomicCheckpoints (checkpoints whole or absent), RichProgress (the bar and metrics.jsonl).

Like train/run.py, which alone imports it, this module imports transformers at the top: only
commands that train load it."""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from transformers import Trainer, TrainerCallback  # imported only by commands that train (train/run.py)

from lora_cli.errors import LoraError
from lora_cli.files import ownership
from lora_cli.train import checkpoint as ckpt
from lora_cli.ui.terminal import plain

EXIT_NONFINITE = 3  # the run diverged; distinct from 2 (bad input) so scripts can tell them apart


class TrainingStopped(LoraError):
    """The run stopped before its last step (signal, non-finite loss, failed save)."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 2):
        super().__init__(message, hint)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- the trainer

class SafeTrainer(Trainer):
    """The Hugging Face Trainer with a per-step non-finite loss flag, supervised-token
    throughput and perplexity in the logs, and train losses that a resumed run logs exactly as
    the uninterrupted run would have (checkpoints are made atomic by AtomicCheckpoints)."""

    reports_perplexity = True  # eval loss is a language-model loss (not for preference objectives)

    def __init__(self, *args, carried_loss: dict | None = None, **kwargs):
        import torch

        super().__init__(*args, **kwargs)
        self.nonfinite = None        # device tensor: a micro-batch of this step had a NaN/inf loss
        self.poisoned = False        # set once the weights took a non-finite step: never save them
        self._supervised = 0         # device tensor: supervised tokens since the last log
        self._last_log_time = time.time()
        # The train loss summed since the last logged step, accumulated exactly as the Trainer
        # sums its own (float32, micro-batch by micro-batch). Saved with each checkpoint; a
        # resumed run starts from the saved sum, so the logging window that spans the
        # interruption averages the same steps as it would have without one.
        carried = carried_loss or {}
        self.loss_window = torch.tensor(float(carried.get("sum", 0.0)), device=self.args.device)
        self.loss_window_since = carried.get("since_step")
        self._window_carried = bool(carried)

    def loss_window_record(self) -> dict:
        """The unlogged loss for the checkpoint being saved (the mean over ranks, like the Trainer's)."""
        total = self.accelerator.reduce(self.loss_window.clone(), reduction="mean")
        return {"sum": float(total), "since_step": self.loss_window_since or 0}

    # -- per-step bookkeeping

    def training_step(self, model, inputs, num_items_in_batch=None):
        import torch

        supervised = supervised_count(inputs)
        if supervised is not None:  # kept on the device: no sync per micro-batch
            self._supervised = self._supervised + supervised
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.loss_window += loss.detach()
        bad = ~torch.isfinite(loss.detach())
        self.nonfinite = bad if self.nonfinite is None else (self.nonfinite | bad)
        return loss

    def take_nonfinite(self) -> bool:
        flag, self.nonfinite = self.nonfinite, None
        return bool(flag) if flag is not None else False

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            if self._window_carried:  # the first log after a resume: average the whole window
                total = self.accelerator.reduce(self.loss_window.clone(), reduction="mean")
                logs["loss"] = float(total) / (self.state.global_step - self.loss_window_since)
                self._window_carried = False
            self.loss_window.zero_()
            self.loss_window_since = self.state.global_step
            logs["supervised_tokens_per_s"] = round(self._tokens_per_second(), 1)
        if "eval_loss" in logs and self.reports_perplexity:
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


def supervised_count(inputs: dict):
    """Supervised tokens of a batch (a device tensor): labels that are not masked, or the
    completion mask of TRL's preference batches (DPO, KTO) or their two label sets (ORPO, SimPO)."""
    if inputs.get("labels") is not None:
        return (inputs["labels"] != -100).sum()
    if inputs.get("completion_mask") is not None:
        return inputs["completion_mask"].sum()
    sides = [inputs[k] for k in ("chosen_labels", "rejected_labels") if inputs.get(k) is not None]
    return sum((s != -100).sum() for s in sides) if sides else None


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
        elif signalled and state.global_step < state.max_steps:  # at the last step the run just ends
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


class AtomicCheckpoints(TrainerCallback):
    """Checkpoints whole or absent, through the Trainer's public hooks only: TrainingArguments
    .output_dir points the Trainer at output_dir/STAGING, and on_save, which the Trainer calls
    once a checkpoint is completely written, claims it for the run, marks it complete and
    renames it into output_dir, then rotates over complete checkpoints. No checkpoint is taken
    at the last step: the final adapter is written instead, once."""

    def __init__(self, output_dir: Path, keep: int | None):
        self.output_dir = Path(output_dir)
        self.keep = keep
        self.trainer: SafeTrainer | None = None
        self.last_saved_step = -1

    def _skip_needless_saves(self, state, control):
        if (state.global_step >= state.max_steps or state.global_step == self.last_saved_step
                or self.trainer.poisoned):  # weights that took a non-finite step are never saved
            control.should_save = False
        return control

    def on_step_end(self, args, state, control, **kwargs):
        return self._skip_needless_saves(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._skip_needless_saves(state, control)

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        window = self.trainer.loss_window_record()  # every rank takes part in the reduction
        self.trainer.accelerator.wait_for_everyone()  # every rank's RNG state is in the staged folder
        if state.is_world_process_zero:
            staged = Path(args.output_dir) / f"{ckpt.PREFIX}-{step}"
            # A pickle of TrainingArguments that nothing reads (lora_recipe.yaml records the
            # settings); dropped so no checkpoint holds a .bin that invites an unsafe load.
            (staged / "training_args.bin").unlink(missing_ok=True)
            ownership.claim(self.output_dir, "train",
                            [f"{staged.name}/{f}" for f in ownership.files_in(staged)] + [f"{staged.name}/{ckpt.MARKER}"])
            ckpt.publish(staged, self.output_dir, step, window)
            removed = ckpt.rotate(self.output_dir, self.keep)
            ownership.forget(self.output_dir, [p.name for p in removed])
        self.trainer.accelerator.wait_for_everyone()
        self.last_saved_step = step
        return control

    def raise_if_save_failed(self, error: Exception, resume_cmd: str) -> None:
        """A write error while a checkpoint was being staged (its folder is still in the staging
        area; on_save moves it out at once otherwise): drop it and stop with exit 2."""
        staging = ckpt.staging_dir(self.output_dir)
        partial = [p for p in staging.glob(f"{ckpt.PREFIX}-*")] if staging.is_dir() else []
        if not partial:
            return
        step = ckpt.checkpoint_step(partial[0])
        shutil.rmtree(staging, ignore_errors=True)
        last = ckpt.newest_complete(self.output_dir)
        kept = f"the previous checkpoint {last} is intact" if last else "no earlier checkpoint exists"
        raise TrainingStopped(f"could not write the checkpoint of step {step}: {error}; {kept}",
                              f"free disk space or fix the folder, then {resume_cmd}"
                              if last else "free disk space or fix the folder, then start again with --overwrite") from None


def progress_columns():
    """The training bar's columns. The bar and the step count have fixed widths and the loss /
    lr / tokens-per-second text folds onto further lines, so at 80 columns nothing is dropped."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.table import Column

    return (TextColumn("train"), BarColumn(bar_width=20), MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}", table_column=Column(overflow="fold", min_width=20)))


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
        self.max_steps = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return

        self.max_steps = state.max_steps
        if plain():  # piped or NO_COLOR: one plain line per log (on_log) instead of a redrawn bar
            return
        from rich.progress import Progress

        self.progress = Progress(*progress_columns(), console=self.console, transient=False)
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
            ppl = f" (ppl {logs['eval_perplexity']:.2f})" if "eval_perplexity" in logs else ""
            self.info["eval"] = f"eval {logs['eval_loss']:.4f}{ppl}"
        if "rewards/margins" in logs:  # preference objectives (TRL's names)
            accuracy = f"reward acc {logs['rewards/accuracies']:.2f} " if "rewards/accuracies" in logs else ""
            self.info["reward"] = f"{accuracy}margin {logs['rewards/margins']:.3f}"
        if "eval_accuracy" in logs:
            self.info["eval"] = f"eval acc {logs['eval_accuracy']:.3f} macro-F1 {logs['eval_macro_f1']:.3f}"
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with self.metrics_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.progress:
            self.progress.update(self.task, info="  ".join(self.info.values()))
        elif self.info and ("loss" in logs or "eval_loss" in logs or "eval_accuracy" in logs):
            self.console.print(f"train {state.global_step}/{self.max_steps}  " + "  ".join(self.info.values()),
                               highlight=False, markup=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.update(self.task, completed=state.global_step)
        self.close()

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None
