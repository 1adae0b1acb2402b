"""The `lora` command: a thin layer over functions the tests call directly.

Heavy libraries (torch, transformers, peft) are imported inside the commands that need them,
so `lora --help` and recipe validation answer at once."""

from __future__ import annotations

import functools
import gc
import importlib
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from typer.core import TyperCommand
from rich.console import Console
from rich.markup import escape

from lora_cli import libraries
from lora_cli.ui import progress
from lora_cli.files import ownership
from lora_cli.errors import LoraError
from lora_cli.files.inputs import check_adapter_name, clip_lines

# Closed sets of values, typed as Literal so --help lists them and click refuses others (exit 2).
# Each comes from the module that owns it (light imports: no torch at start-up).
from lora_cli.export.gguf import EXPORTERS, FORMATS as EXPORT_FORMATS  # noqa: E402
from lora_cli.export.merge import MERGE_DTYPES  # noqa: E402
from lora_cli.infer.engines import ENGINE_DOCS, ENGINES  # noqa: E402
from lora_cli.tiny.encoders import ARCHS  # noqa: E402

ArchChoice = Literal[ARCHS]
ExportFormat = Literal[EXPORT_FORMATS]
MergeDtype = Literal[MERGE_DTYPES]


def choices_help(docs: dict[str, str]) -> str:
    """An option's help from its registry: "a (what a is), b (...) or c (...)."."""
    named = [f"{name} ({doc})" for name, doc in docs.items()]
    return (", ".join(named[:-1]) + " or " if len(named) > 1 else "") + named[-1] + "."


EXIT_CODES = "Exit codes: 0 done, 1 unexpected error (a bug: please report it with `lora env`), 2 bad input, 3 non-finite loss (train), 130 interrupted (Ctrl-C), 143 stopped by SIGTERM (train)."

# Typer's own shell completion (--install-completion / --show-completion for bash, zsh, fish,
# PowerShell): completing a word runs only this module's imports, never torch.
app = typer.Typer(help="LoRA and QLoRA fine-tuning driven by YAML recipes.\n\n" + EXIT_CODES, no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=True)
console = Console(soft_wrap=True)  # lora's status lines and progress: --quiet silences it; long lines stay whole
# What a command answers (an answer's header, a report, a table, a warning): printed under --quiet
# too, so quiet output keeps its structure. Status ("written to ...") stays on `console`.
results = Console(soft_wrap=True)
PIPED_TABLE_WIDTH = 400  # results' width when stdout is not a terminal (run()); wide tables are rare
err_console = Console(stderr=True, soft_wrap=True)

RecipePath = Annotated[Path, typer.Argument(help="Recipe YAML file (see recipes/).")]
SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: --set train.learning_rate=3e-4 (repeatable).")]
AdapterOption = Annotated[Optional[list[str]], typer.Option("--adapter", "-a", help="Adapter folder (a run's output_dir or a checkpoint), or NAME=DIR.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document (layout: docs/cli.md) instead of text.")]
BaseOption = Annotated[Optional[str], typer.Option("--base", help="Base model to use instead of the one the adapter names.")]
# Only the user may allow code shipped in a model, tokenizer or adapter folder to run; never a saved recipe.
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow Python shipped with the base model or tokenizer (auto_map) to run. Only for folders whose author you trust.")]


def _print_version(value: bool) -> None:
    if value:
        from lora_cli.env_report import lora_version  # here, not at the top: `lora --help` starts fast

        print(f"lora {lora_version()}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print lora's version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Let the libraries' own logs and warnings through (for bug reports).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or status lines: only results (answers with their headers, reports, tables, --json), warnings and errors.")] = False,
):
    # options of `lora` itself; the app's help is the Typer(help=...) above.
    # --verbose took effect in run(), before any library was imported.
    console.quiet = quiet


def with_resume_path(args: list[str]) -> list[str]:
    """`train ... --resume DIR` means `--resume-from DIR`. Click cannot give an option an
    optional value, so the folder form is rewritten before parsing. A folder is never the
    recipe (a file), so `train --resume recipe.yaml` keeps its meaning."""
    out = list(args)
    for i, word in enumerate(out[:-1]):
        if word == "--resume" and not out[i + 1].startswith("-") and Path(out[i + 1]).is_dir():
            out[i] = "--resume-from"
    return out


class ResumeWithFolder(TyperCommand):
    """The train command, reading `--resume DIR` as `--resume-from DIR` whoever invokes it
    (`lora`, or click's CliRunner in tests)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, with_resume_path(args))


@app.command(cls=ResumeWithFolder)
def train(
    recipe: RecipePath,
    set_: SetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Load model, data and adapter, print the plan, train nothing.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier lora run in output_dir.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in output_dir from its newest complete checkpoint; --resume DIR continues from that checkpoint folder.")] = False,
    resume_from: Annotated[Optional[Path], typer.Option(
        "--resume-from", metavar="CHECKPOINT", help="Continue the run from this checkpoint-N folder of output_dir.")] = None,
):
    """Fine-tune a LoRA / QLoRA adapter as the recipe says.

    Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and exits 130 / 143;
    a non-finite loss stops the run with exit code 3."""
    # here, not at the top: `lora --help` starts fast
    from lora_cli.train.checkpoint import Resume
    from lora_cli.train.output_dir import refuse_output_dir
    from lora_cli.recipe.schema import load_recipe

    r = load_recipe(recipe, set_ or [])
    resuming = Resume(resume_from) if resume_from else Resume() if resume else None
    # a busy, finished or foreign output_dir is refused at once, not after the libraries load
    refuse_output_dir(r, dry_run=dry_run, overwrite=overwrite, resume=resuming, recipe_path=recipe)
    # The Trainer's import takes seconds: a spinner says so
    with progress.spinner("loading the training libraries", console):
        from lora_cli.train.run import TrainingStopped, run_training  # here, not at the top: `lora --help` starts fast

    try:
        run_training(r, dry_run=dry_run, overwrite=overwrite, recipe_path=recipe, console=results if dry_run else console,
                     resume=resuming)
    except TrainingStopped as e:
        if e.exit_code == 2:
            raise
        err_console.print(f"[bold yellow]stopped:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(e.exit_code) from None


@app.command()
def check(
    recipe: RecipePath,
    set_: SetOption = None,
    strict: Annotated[bool, typer.Option("--strict", help="Treat warnings as errors (exit 2), for CI.")] = False,
    as_json: JsonOption = False,
):
    """Validate a recipe and warn about risky hyperparameters, without loading anything heavy."""
    # here, not at the top: `lora --help` starts fast
    from lora_cli.train.lint import lint_recipe, refuse_if_strict, verdict
    from lora_cli.recipe.schema import load_recipe

    findings = lint_recipe(load_recipe(recipe, set_ or []))
    if as_json:
        from lora_cli.json_output import check_doc, emit  # here, not at the top: `lora --help` starts fast

        emit("check", check_doc(recipe, findings, strict))
        raise typer.Exit(2 if findings and strict else 0)
    for finding in findings:
        results.print(f"[yellow]warning[/] {escape(str(finding))}", highlight=False)
    refuse_if_strict(findings, recipe, strict)
    results.print(verdict(findings, recipe))


def parse_adapters(specs: list[str] | None) -> dict[str, str]:
    """['runs/a', 'b=runs/b'] -> {'a': 'runs/a', 'b': 'runs/b'}; names default to the folder's."""
    adapters: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name or "adapter", spec
        check_adapter_name(name, f"--adapter {spec}")
        if name in adapters:
            raise LoraError(f"--adapter: name {name!r} given twice", "name them: --adapter a=DIR1 --adapter b=DIR2")
        adapters[name] = path
    return adapters


def adapter_inputs(adapters: dict[str, str], base: str | None) -> list[tuple[str, str]]:
    """The folders an adapter command reads, for the output check: each adapter, the base it
    names and --base. A damaged adapter is left to the loader to refuse."""
    from lora_cli.model.adapter_folder import read_adapter  # here, not at the top: `lora --help` starts fast

    inputs: list[tuple[str, str]] = [("base model (--base)", base)] if base else []
    for name, path in adapters.items():
        inputs.append((f"adapter {name}", path))
        try:
            inputs.append((f"base model of adapter {name}", read_adapter(path).base))
        except LoraError:
            pass
    return inputs


def _generation_settings(max_new_tokens, temperature, top_p, repetition_penalty, seed):
    # here, not at the top: `lora --help` starts fast
    from lora_cli.infer.settings import GenerationSettings

    try:
        return GenerationSettings(max_new_tokens, temperature, top_p, repetition_penalty, seed)
    except LoraError as e:  # name the flag, not the field: "top_p must ..." -> "--top-p must ..."
        raise LoraError("--" + e.message.replace("_", "-"), e.hint) from None


MaxNew = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 = greedy (default); > 0 samples (at most 100).")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with --temperature > 0).")]
RepPenalty = Annotated[float, typer.Option("--repetition-penalty", help="> 1 discourages repeats; 0.01 to 100.")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Seed for reproducible sampling.")]
TemplateOption = Annotated[Optional[str], typer.Option("--template", help="Prompt template (default: the one each adapter was trained with).")]
ToolsOption = Annotated[Optional[Path], typer.Option("--tools", help="JSON list of function schemas offered to the model, rendered as training rendered a row's tools.")]


def progress_console(stdout_busy: bool) -> Console:
    """Where progress goes: stderr while stdout carries results (answers, a JSON document),
    stdout otherwise; --quiet silences it either way."""
    return err_console if stdout_busy and not console.quiet else console


def _load_variants(adapter, base, template, engine: str = "transformers", trust_remote_code: bool = False):
    """(inference backend, adapter infos, base template) for generate, chat and serve."""
    # here, not at the top: `lora --help` starts fast
    from lora_cli.infer.engines import backend_class
    from lora_cli.data.template import resolve_template

    if template:
        resolve_template(template)  # unknown names fail before anything heavy loads
    # here, not at the top: `lora --help` starts fast
    from lora_cli.model.adapter_folder import refuse_unless

    adapters = parse_adapters(adapter)
    refuse_unless("generates", adapters, "lora generate / chat", "label rows with lora predict --adapter {adapter} --file ROWS.jsonl --out preds.jsonl")
    with progress.spinner("loading the model", console):
        backend, infos = backend_class(engine).load(adapters, base=base, trust_remote_code=trust_remote_code)
    default = template or next((i.template for i in infos.values()), "human_assistant")
    return backend, infos, default


@app.command()
def generate(
    instruction: Annotated[Optional[str], typer.Argument(help="The instruction to answer (or use --file).")] = None,
    adapter: AdapterOption = None,
    base: BaseOption = None,
    input: Annotated[str, typer.Option("--input", help="Optional input for the instruction (alpaca 'input').")] = "",
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Prompts: .jsonl (instruction/input rows) or .txt (one per line).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write results as .jsonl (prompt, adapter, response, settings).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    base_only: Annotated[bool, typer.Option("--base-only", help="Answer with the base alone (adapters off): the 'before' of a before/after.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per generate call (left-padded).")] = 8,
    template: TemplateOption = None,
    tools: ToolsOption = None,
    max_new_tokens: MaxNew = 128,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    repetition_penalty: RepPenalty = 1.0,
    seed: Seed = None,
    trust_remote_code: TrustRemoteCode = False,
):
    """Answer prompts with base + adapter(s), rendered by the template training used.
    Several --adapter answer the same prompts side by side."""
    import json

    # here, not at the top: `lora --help` starts fast
    from lora_cli.infer.generate import BASE, Prompt, read_prompts, read_tools

    settings = _generation_settings(max_new_tokens, temperature, top_p, repetition_penalty, seed)
    tool_schemas = read_tools(tools) if tools else None
    if (instruction is None) == (file is None):
        raise LoraError("give one instruction or --file PROMPTS, not both and not neither",
                        'lora generate --adapter runs/demo "..."  or  lora generate --adapter runs/demo --file prompts.jsonl')
    if out is not None:
        ownership.check_output(out, "generate", force=force, inputs=[
            ("prompt file (--file)", file), ("tools file (--tools)", tools), *adapter_inputs(parse_adapters(adapter), base)])
    prompts = read_prompts(file) if file else [Prompt(instruction, input)]
    # here, not at the top: `lora --help` starts fast
    from lora_cli.infer.generate import generate_rows

    backend, infos, default_template = _load_variants(adapter, base, template, trust_remote_code=trust_remote_code)
    if base_only or not infos:
        variants = {BASE: (None, default_template)}
    else:
        variants = {name: (name, template or info.template) for name, info in infos.items()}
    shown_on = progress_console(stdout_busy=out is None)  # answers printed on stdout stay clean
    with progress.task("answering", shown_on, unit="answers") if file else progress.spinner("answering", console):
        rows = generate_rows(backend, prompts, variants, settings, batch_size, tools=tool_schemas)
    if out is not None:
        ownership.write_output_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "generate")
        console.print(f"{len(rows)} answers ({len(prompts)} prompts x {len(variants)} variants) written to {out}")
    elif len(rows) == 1:
        print(rows[0]["response"])
    else:
        for r in rows:
            results.print(f"[bold]\\[{escape(r['adapter'])}][/] {escape(r['instruction'])}", highlight=False)
            print(r["response"], end="\n\n")


@app.command()
def chat(
    adapter: AdapterOption = None,
    base: BaseOption = None,
    template: TemplateOption = None,
    system: Annotated[str, typer.Option("--system", help="System prompt to start with (/system changes it).")] = "",
    tools: ToolsOption = None,
    max_new_tokens: MaxNew = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    repetition_penalty: RepPenalty = 1.0,
    seed: Seed = None,
    trust_remote_code: TrustRemoteCode = False,
):
    """Talk to the base with one or more adapters; /adapter NAME switches, /help lists commands.
    Answers stream as they are generated; Ctrl-C stops one, /exit leaves."""
    settings = _generation_settings(max_new_tokens, temperature, top_p, repetition_penalty, seed)
    # here, not at the top: `lora --help` starts fast
    from lora_cli.infer.generate import ChatSession, chat_loop, read_tools

    tool_schemas = read_tools(tools) if tools else []
    backend, infos, default_template = _load_variants(adapter, base, template, trust_remote_code=trust_remote_code)
    session = ChatSession(backend, {n: template or i.template for n, i in infos.items()}, settings,
                          adapter=next(iter(infos), None), base_template=default_template, system=system,
                          tools=tool_schemas,
                          inputs=[("tools file (--tools)", tools), *adapter_inputs(parse_adapters(adapter), base)])
    chat_loop(session)


EngineChoice = Literal[ENGINES]


@app.command()
def serve(
    adapter: AdapterOption = None,
    base: BaseOption = None,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on; 0.0.0.0 opens the server to other machines.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LORA_API_KEY", help="Require 'Authorization: Bearer KEY' (or set LORA_API_KEY).")] = None,
    engine: Annotated[EngineChoice, typer.Option("--engine", help=choices_help(ENGINE_DOCS))] = "transformers",
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most answers generated in one batch.")] = 16,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Most requests waiting or running; beyond it, 429.")] = 64,
    max_body: Annotated[str, typer.Option("--max-body", help="Largest request body (bytes, or 512k, 8M); beyond it, 413.")] = "8M",
    trust_remote_code: TrustRemoteCode = False,
):
    """OpenAI-compatible server: /v1/models, /v1/chat/completions, /v1/completions, /health.
    A request's `model` names an adapter, or `base` for the base with adapters off.
    On an open network put it behind a TLS reverse proxy (docs/serve.md)."""
    import os

    from lora_cli.infer.guard import Limits, check_api_key, parse_size  # here, not at the top: `lora --help` starts fast

    if engine not in ENGINES:
        raise LoraError(f"--engine {engine!r} is not one of {', '.join(ENGINES)}")
    api_key = check_api_key(api_key, os.environ.get("LORA_API_KEY"))
    limits = Limits(max_body=parse_size(max_body))
    if engine == "vllm":
        _serve_with_vllm(parse_adapters(adapter), base, host, port, api_key)
        return
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise LoraError("lora serve needs FastAPI and uvicorn", libraries.install_hint("serve")) from None
    # here, not at the top: `lora --help` starts fast
    from lora_cli.infer.serve import build_server, run_server

    server = build_server(parse_adapters(adapter), base=base, api_key=api_key, engine=engine,
                          max_batch=max_batch, max_queue=max_queue, limits=limits, trust_remote_code=trust_remote_code)
    run_server(server, host, port, log=lambda line: console.print(line, highlight=False, markup=False))


def _serve_with_vllm(adapters: dict, base, host: str, port: int, api_key) -> None:
    import subprocess
    import tempfile

    # here, not at the top: `lora --help` starts fast
    from lora_cli.infer.vllm import missing_for_vllm, prepare_vllm

    with tempfile.TemporaryDirectory(prefix="lora-vllm-") as work:
        argv = prepare_vllm(adapters, base=base, host=host, port=port, api_key=api_key, work_dir=Path(work))
        shown = shlex.join(a if a != api_key else "$LORA_API_KEY" for a in argv)
        missing = missing_for_vllm()
        if missing:
            raise LoraError("--engine vllm cannot start here: " + "; ".join(missing),
                            f"on a GPU machine with vLLM this runs: {shown}")
        console.print(f"starting vLLM: {shown}", highlight=False, markup=False)
        raise typer.Exit(subprocess.call(argv))


@app.command()
def predict(
    adapter: Annotated[str, typer.Option("--adapter", "-a", help="A classification adapter folder.")],
    file: Annotated[Path, typer.Option("--file", "-f", help="Rows to label: .jsonl / .json / .csv with text (and text_pair; a label is compared).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Write each row's label and probabilities as .jsonl.")],
    base: BaseOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    trust_remote_code: TrustRemoteCode = False,
    as_json: JsonOption = False,
):
    """Label rows with a classification adapter: predicted label and every label's probability
    per row; accuracy, macro-F1 and the confusion matrix when the rows carry their labels."""
    import json

    # here, not at the top: `lora --help` starts fast
    from lora_cli.model.adapter_folder import refuse_unless

    ownership.check_output(out, "predict", force=force,
                           inputs=[("rows (--file)", file), *adapter_inputs({"adapter": adapter}, base)])
    refuse_unless("predicts_labels", {"adapter": adapter}, "lora predict", 'use lora generate --adapter {adapter} "..."')
    # here, not at the top: `lora --help` starts fast
    from lora_cli.model.load import load_for_inference
    from lora_cli.tasks.classification import predict_file

    shown_on = progress_console(stdout_busy=as_json)  # stdout carries the one JSON document
    with progress.spinner("loading the model", shown_on):
        model, tokenizer, infos = load_for_inference({"adapter": adapter}, base=base, trust_remote_code=trust_remote_code)
    info = infos["adapter"]
    labels = list(info.model_section["labels"])
    with progress.task("labelling", shown_on, unit="rows"):
        rows, report = predict_file(model, tokenizer, labels, file, int(info.recipe["data"]["max_length"]))
    ownership.write_output_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "predict")
    if as_json:
        from lora_cli.json_output import emit, predict_doc  # here, not at the top: `lora --help` starts fast

        emit("predict", predict_doc(adapter, file, out, rows, labels, report))
        return
    console.print(f"{len(rows)} rows labelled ({', '.join(labels)}) written to {out}")
    for line in report.lines() if report else []:
        results.print("  " + line, highlight=False, markup=False)


@app.command("eval")
def eval_(
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Rows to ask (any shape training reads); the reference is each row's supervised answer.")] = None,
    adapter: AdapterOption = None,
    base: Annotated[bool, typer.Option("--base", help="Ask the adapters' base too (adapters switched off).")] = False,
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="Base to load instead of the one the adapters name (or, alone, the model to evaluate).")] = None,
    merged: Annotated[Optional[list[str]], typer.Option("--merged", help="A merged model folder (`lora merge --out`); repeatable.")] = None,
    gguf: Annotated[Optional[list[str]], typer.Option("--gguf", help="A GGUF file (`lora export --format gguf`), run by llama-cpp-python; repeatable.")] = None,
    endpoint: Annotated[Optional[list[str]], typer.Option("--endpoint", help="An OpenAI-compatible server URL (e.g. `lora serve`'s); repeatable.")] = None,
    endpoint_model: Annotated[Optional[str], typer.Option("--endpoint-model", help="The model id to ask at --endpoint (needed when it serves several).")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LORA_API_KEY", help="Bearer key for --endpoint.")] = None,
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="Comma-separated metric names (lora_cli/eval/metrics.py) or module:function; default: all that fit.")] = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="lm-evaluation-harness tasks (e.g. mmlu,gsm8k) run on the base and each adapter.")] = None,
    include_path: Annotated[Optional[Path], typer.Option("--include-path", help="Folder of local lm-eval task YAML files for --tasks.")] = None,
    baseline: Annotated[Optional[str], typer.Option("--baseline", help="Candidate the differences are taken to (default: the first).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for eval.json, answers.jsonl and eval.png.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if an earlier `lora eval` wrote it.")] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Ask only the first N rows.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Rows per generate call (or concurrent endpoint requests).")] = 8,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=10, help="Bootstrap resamples for the intervals.")] = 1000,
    template: TemplateOption = None,
    max_new_tokens: MaxNew = 64,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = None,
):
    """Ask the base, adapters, merged folders, GGUF files and endpoints the same rows; one table
    of metrics with each candidate's difference to the first and a bootstrap interval."""
    from lora_cli.eval.run import Request, Settings  # here, not at the top: `lora --help` starts fast

    _generation_settings(max_new_tokens, temperature, top_p, 1.0, seed)  # checked, named by flag
    if data is None and not tasks:
        raise LoraError("lora eval needs --data FILE (the rows to ask), or --tasks for lm-eval benchmarks",
                        "e.g. lora eval --data data/demo.jsonl --base -a runs/demo")
    request = Request(str(data) if data else "", parse_adapters(adapter), base, base_model, list(merged or []), list(gguf or []),
                      list(endpoint or []), endpoint_model, api_key, template,
                      [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None, baseline, limit,
                      bootstrap, Settings(max_new_tokens, temperature, top_p, seed, batch_size))
    if tasks:
        from lora_cli.eval.harness import run_tasks  # here, not at the top: `lora --help` starts fast

        record = run_tasks(request, [t.strip() for t in tasks.split(",") if t.strip()], include_path, out, force,
                           log=console.print)
        from lora_cli.eval.harness import print_tasks  # here, not at the top: `lora --help` starts fast

        print_tasks(record, results)
        return
    from lora_cli.eval.run import print_table, run_eval  # here, not at the top: `lora --help` starts fast

    with progress.task("lora eval", console, unit="answers"):  # rows x passes, every candidate
        record = run_eval(request, out, force, log=console.print)
    print_table(record, results)
    if out is not None:
        console.print(f"written to {out}: eval.json, answers.jsonl, eval.png")


@app.command()
def merge(
    adapter: Annotated[str, typer.Option("--adapter", "-a", help="Adapter folder to merge.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the merged model.")],
    base: BaseOption = None,
    dtype: Annotated[Optional[MergeDtype], typer.Option("--dtype", help="Saved precision (default: float32).")] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors file, e.g. 5GB or 500MB; bigger models are sharded.")] = "5GB",
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    trust_remote_code: TrustRemoteCode = False,
):
    """Fold the adapter into its base and write a full model folder (safetensors, tokenizer,
    generation config, model card) that plain transformers loads."""
    # here, not at the top: `lora --help` starts fast
    from lora_cli.export.merge import merge_adapter

    with progress.task(f"merging into {out}", console):  # the stages merge_adapter names
        merge_adapter(adapter, out, dtype=dtype, force=force, base=base, max_shard_size=max_shard_size, log=console.print,
                      trust_remote_code=trust_remote_code)


@app.command()
def export(
    adapter: Annotated[str, typer.Option("--adapter", "-a", help="Adapter folder to export.")],
    format: Annotated[ExportFormat, typer.Option("--format", help=choices_help({name: e.doc for name, e in EXPORTERS.items()}))],
    out: Annotated[Path, typer.Option("--out", help="The .gguf file (gguf, gguf-adapter) or folder (ollama) to write.")],
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="f16 (default), bf16, f32 or q8_0; gguf-adapter: f32 (default), f16, bf16.")] = None,
    base: BaseOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out, if an earlier `lora export` wrote it.")] = False,
):
    """Write the adapter for llama.cpp / Ollama: merged into its base as GGUF (tokenizer and the
    training template as chat template included), as a GGUF LoRA adapter, or as an Ollama folder."""
    # here, not at the top: `lora --help` starts fast
    from lora_cli.export.gguf import export as run_export

    with progress.task(f"exporting {out}", console):  # the merge's stages, each tensor, the file
        run_export(adapter, out, format=format, dtype=dtype, force=force, base=base, log=console.print)


@app.command()
def save(
    source: Annotated[Path, typer.Argument(help="A run's output_dir or one of its checkpoint-N folders.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the clean adapter.")],
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
):
    """Export a clean adapter folder (adapter weights and config, tokenizer, recipe, model card;
    no optimizer state)."""
    # here, not at the top: `lora --help` starts fast
    from lora_cli.export.merge import save_adapter

    save_adapter(source, out, force=force, log=console.print)


@app.command()
def estimate(
    recipe: RecipePath,
    set_: SetOption = None,
    budget: Annotated[Optional[str], typer.Option("--budget", help="Trainable-parameter budget, e.g. 10M: solve for the largest rank under it.")] = None,
    as_json: JsonOption = False,
):
    """Trainable parameters, adapter size and training memory, from the model's config alone."""
    # here, not at the top: `lora --help` starts fast
    from lora_cli.recipe.schema import load_recipe

    r = load_recipe(recipe, set_ or [])
    # here, not at the top: `lora --help` starts fast
    from lora_cli.train.estimate import estimate_recipe, parse_count, print_estimate

    limit = parse_count(budget) if budget is not None else None
    with progress.spinner("reading the model's config", progress_console(stdout_busy=as_json)):  # torch's import: seconds
        est = estimate_recipe(r, budget=limit)
    if as_json:
        from lora_cli.json_output import emit, estimate_doc  # here, not at the top: `lora --help` starts fast

        emit("estimate", estimate_doc(est, r))
        return
    print_estimate(est, r, results)


@app.command()
def sweep(
    recipe: RecipePath,
    ranks: Annotated[str, typer.Option("--ranks", help="Ranks to train, e.g. 4,8,16,32,64.")],
    set_: SetOption = None,
    threshold: Annotated[float, typer.Option("--threshold", help="Knee: the smallest rank after which doubling improves the loss by less than this share.")] = 0.02,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="PNG of loss and parameters against rank (default: output_dir/sweep.png).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --plot if an earlier `lora sweep` wrote it.")] = False,
):
    """Train the recipe at several ranks (output_dir/r{rank}) and find the knee; reruns skip finished ranks."""
    # here, not at the top: `lora --help` starts fast
    from lora_cli.recipe.schema import load_recipe
    from lora_cli.train.sweep import parse_ranks

    rank_list = parse_ranks(ranks)
    r = load_recipe(recipe, set_ or [])
    # here, not at the top: `lora --help` starts fast
    from lora_cli.train.sweep import print_sweep, run_sweep

    print_sweep(run_sweep(r, rank_list, threshold=threshold, plot=plot, force=force, recipe_path=recipe,
                          console=console), results)


@app.command()
def analyze(
    adapter: Annotated[Path, typer.Argument(help="Adapter folder (a run's output_dir, a checkpoint, or a `lora save` export).")],
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a per-module PNG of effective ranks and update norms.")] = None,
    base: BaseOption = None,
    no_base: Annotated[bool, typer.Option("--no-base", help="Skip loading the base (no ||dW|| / ||W|| column).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace --plot if an earlier `lora analyze` wrote it.")] = False,
    trust_remote_code: TrustRemoteCode = False,
    as_json: JsonOption = False,
):
    """Singular values of each learned update B·A: effective and stable rank, size against the frozen weight."""
    # here, not at the top: `lora --help` starts fast
    from lora_cli.model.analyze import analyze_adapter, plot_analysis, print_analysis

    if plot is not None:  # before the work: the plot may not replace what the analysis reads
        ownership.check_output(plot, "analyze", force=force, flag="--plot",
                               inputs=adapter_inputs({"adapter": str(adapter)}, base))
    with progress.spinner("reading the adapter" + ("" if no_base else " and its base"), progress_console(stdout_busy=as_json)):
        result = analyze_adapter(adapter, base=base, with_base=not no_base, trust_remote_code=trust_remote_code)
    if as_json:
        from lora_cli.json_output import analyze_doc, emit  # here, not at the top: `lora --help` starts fast

        emit("analyze", analyze_doc(result, plot_analysis(result, plot) if plot is not None else None))
        return
    print_analysis(result, results)
    if plot is not None:
        console.print(f"[bold]plot[/]    {plot_analysis(result, plot)}")


@app.command("build-tiny")
def build_tiny(
    out: Annotated[Path, typer.Option("--out", help="Folder for the model.")] = Path("models/tiny-llama"),
    data: Annotated[Path, typer.Option("--data", help="Text to train tokenizer and base on.")] = Path("data/demo.jsonl"),
    steps: Annotated[int, typer.Option("--steps", min=1, help="Pre-training steps.")] = 300,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    arch: Annotated[ArchChoice, typer.Option("--arch", help="llama (causal_lm), bert (classification), t5 or bart (seq2seq).")] = "llama",
    force: Annotated[bool, typer.Option("--force", help="Replace --out if an earlier build-tiny wrote it.")] = False,
):
    """Build a tiny offline base: the Llama the demo and tests use, or a BERT, T5 or BART shape."""
    # here, not at the top: `lora --help` starts fast
    from lora_cli.tiny.encoders import ARCHS

    if arch not in ARCHS:
        raise LoraError(f"--arch {arch!r} is not one of {', '.join(ARCHS)}")
    if arch == "llama":
        # here, not at the top: `lora --help` starts fast
        from lora_cli.tiny.decoder import build_tiny_model

        said: list[str] = []  # the builder's lines after the progress ends, whose last line would follow them
        with progress.task("pre-training the tiny base", console, total=steps):
            build_tiny_model(out, data, steps=steps, seed=seed, force=force, log=said.append)
        for line in said:
            console.print(line)
        return
    # here, not at the top: `lora --help` starts fast
    from lora_cli.tiny.encoders import build_tiny_encoder_model

    waiting = (progress.spinner(f"building the tiny {arch}", console) if arch == "bert"  # random: nothing to train
               else progress.task(f"pre-training the tiny {arch}", console, total=steps))
    said = []
    with waiting:
        build_tiny_encoder_model(out, data, arch, steps=None if arch == "bert" else steps, seed=seed, force=force,
                                 log=said.append)
    for line in said:
        console.print(line)


@app.command("recipe-keys")
def recipe_keys(
    update: Annotated[Optional[Path], typer.Option("--update", help="Rewrite the reference block of this README in place.")] = None,
):
    """Print every recipe key with its type, default and meaning (Markdown)."""
    # here, not at the top: `lora --help` starts fast
    from lora_cli.recipe.schema import reference_markdown, update_reference

    if update is None:
        print(reference_markdown())
        return
    update_reference(update)
    console.print(f"{update}: recipe reference updated")


@app.command()
def schema():
    """Print the recipe's JSON Schema (generated from the one recipe schema), for editors and CI."""
    from lora_cli.recipe.json_schema import schema_text  # here, not at the top: `lora --help` starts fast

    sys.stdout.write(schema_text())


@app.command()
def env(as_json: JsonOption = False):
    """Versions of lora, python, torch, transformers, peft, bitsandbytes and the device: paste it into a bug report."""
    from lora_cli.env_report import environment  # here, not at the top: `lora --help` starts fast

    report = environment()
    if as_json:
        from lora_cli.json_output import emit  # here, not at the top: `lora --help` starts fast

        emit("env", report)
        return
    width = max(map(len, report))
    for name, value in report.items():
        print(f"{name:<{width}}  {value}")


data_app = typer.Typer(help="Look at training data as the model will see it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("preview")
def data_preview(
    recipe: RecipePath,
    set_: SetOption = None,
    rows: Annotated[int, typer.Option("--rows", min=0, help="Examples to print.")] = 3,
    as_json: JsonOption = False,
):
    """Decoded rows with the supervised part highlighted, lengths, and what was kept / cut / dropped."""
    # here, not at the top: `lora --help` starts fast
    from lora_cli.recipe.schema import load_recipe
    from lora_cli.tasks import get_task

    r = load_recipe(recipe, set_ or [])
    if not get_task(r.model.task).token_stream:
        raise LoraError(f"lora data preview shows causal-LM rows; model.task is {r.model.task}",
                        f"lora train {shlex.quote(str(recipe))} --dry-run shows this task's rows, labels and one decoded example")
    if as_json:
        # here, not at the top: `lora --help` starts fast
        from lora_cli.json_output import emit, preview_doc
        from lora_cli.train.preview import load_preview

        emit("data_preview", preview_doc(r, recipe, *load_preview(r), rows=rows))
        return
    # here, not at the top: `lora --help` starts fast
    from lora_cli.train.preview import preview_data

    preview_data(r, rows=rows, console=results)


def _click_error_types() -> tuple[type, ...]:
    """Usage-error classes: recent typer raises those of the click copy it vendors
    (typer._click); older typer, and plain click code, raise click's own."""
    types_ = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            types_.append(importlib.import_module(module).ClickException)
        except ImportError:
            pass
    return tuple(types_)


def _optional_click(name: str) -> list[type]:
    try:
        return [getattr(importlib.import_module("click.exceptions"), name)]
    except ImportError:
        return []


def _wants_verbose(argv: list[str]) -> bool:
    """-v/--verbose among the options before the command name (they belong to `lora` itself)."""
    for word in argv:
        if not word.startswith("-"):
            return False
        if word in ("-v", "--verbose"):
            return True
    return False


@functools.lru_cache(maxsize=2)
def _click_command(markup_mode: str | None):
    """The click command Typer builds from `app` (what `app(...)` builds anew on every call,
    about 80 ms): once per process and help style, so a process that runs many commands
    (the test suite, `make fuzz`'s thousands of in-process cases) pays for it once. `app` has
    pretty_exceptions_enable=False, so calling the command is what calling `app` does."""
    app.rich_markup_mode = markup_mode
    return typer.main.get_command(app)


def utf8_when_redirected() -> None:
    """Piped or redirected on Windows, Python writes the ANSI code page (cp1252): `lora schema >
    s.json`, a --json summary or a Chinese answer came out mangled, or failed on a character the
    code page lacks. What lora writes to a pipe or file is UTF-8 on every platform; a console
    keeps Python's own Unicode handling, and PYTHONIOENCODING, when the user sets it, wins."""
    if os.environ.get("PYTHONIOENCODING"):
        return
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if stream is not None and encoding != "utf8" and hasattr(stream, "reconfigure") and not stream.isatty():
            stream.reconfigure(encoding="utf-8")


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code. User errors print as one clear message and
    return 2, never a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    utf8_when_redirected()
    libraries.configure(verbose=_wants_verbose(argv))
    from lora_cli.ui.terminal import plain  # here, not at the top: `lora --help` starts fast

    command = _click_command(None if plain() else "rich")  # piped / NO_COLOR help: click's plain text, no boxes
    if not results.is_terminal and not os.environ.get("COLUMNS"):
        # piped, rich assumes 80 columns and cuts table cells to "…" (eval's candidate names among
        # them); a log or a pasted Markdown table wants them whole: tables keep their natural width
        results.width = PIPED_TABLE_WIDTH
    exit_types = tuple({typer.Exit, *_optional_click("Exit")})
    abort_types = tuple({typer.Abort, *_optional_click("Abort")})
    try:
        # without standalone mode, click returns the code of a typer.Exit instead of raising it
        code = command(args=argv, standalone_mode=False, prog_name="lora")
    except LoraError as e:
        err_console.print(f"[bold red]error:[/] {escape(clip_lines(str(e)))}", highlight=False)
        return e.exit_code
    except exit_types as e:
        return e.exit_code
    except abort_types:
        err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except _click_error_types() as e:  # usage errors: unknown command or option, missing argument
        e.show()
        return e.exit_code
    return code if isinstance(code, int) and not isinstance(code, bool) else 0


def main() -> None:
    code = run(sys.argv[1:])
    # The process ends here: let the collector skip the millions of objects torch, transformers
    # and peft created, which the interpreter would otherwise trace once more while tearing
    # itself down (1.35 s of every such command's wall, 0.18 s frozen). Exit handlers still run.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    main()
