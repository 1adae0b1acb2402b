"""`lora eval`: the same rows asked of several candidates (the base, adapters, a merged model
folder, a GGUF file, an OpenAI-compatible endpoint), scored by the metrics of metrics.py, with
the difference to the first candidate and a bootstrap confidence interval over rows.

Every candidate is asked the same prompt ids: the rows are read as training reads them (the
task's `eval_rows` hook, tasks/), the reference is the supervised answer (the last assistant
turn), and the prompt is everything before it rendered by the reference adapter's saved template
(template.prompt_ids, the one rendering path). Transformers candidates answer through the
inference backend (backends.py), the GGUF file through llama-cpp-python, the endpoint through
its /v1/chat/completions (the server renders; its prompt_tokens are checked against ours).

A candidate kind is one class in CANDIDATES; a metric is one entry in metrics.METRICS."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lora_cli.errors import DataError, LoraError
from lora_cli.libraries import install_hint
from lora_cli.eval.metrics import Answer, CLASSIFICATION_DEFAULT, GENERATION_DEFAULT, Metric, resolve_metrics
from lora_cli.data.template import (conversation_segments, encode_segments, IGNORE_INDEX, jinja_chat_template,
                                    prompt_ids, resolve_template, TemplateSpec, tokenize_texts, user_content)
from lora_cli.tasks.classification import predict_probabilities
from lora_cli.model.adapter_folder import read_adapter
from lora_cli.tasks import get_task, hooks, TASKS
from lora_cli.tasks.hooks import EvalRow
from lora_cli.infer.engines import active_adapter, GenerationRequest, TransformersBackend, using_variant
from lora_cli.model.load import load_base_model, load_for_inference, load_tokenizer, local_device
from lora_cli.recipe.schema import ModelConfig
from lora_cli.files import ownership
from lora_cli.infer.settings import GenerationSettings
from lora_cli.tasks.seq2seq import tokenize_seq2seq
from lora_cli.ui import progress
from lora_cli.ui.terminal import table_box
from lora_cli.infer.generate import refuse_over_context, refuse_overlong_text, tools_chars

EVAL_FILE = "eval.json"
ANSWERS_FILE = "answers.jsonl"
PLOT_FILE = "eval.png"
LAYOUT_VERSION = 1
CONFIDENCE = 0.95
CHECKED_ROWS = 8  # rows whose prompt and answer texts are tokenised by both sides to compare tokenizers


# --------------------------------------------------------------------------- rows

def read_eval_rows(path: str, *, fmt: str = "auto", columns: dict | None = None, limit: int | None = None,
                   task: str = "causal_lm") -> list[EvalRow]:
    """The rows to ask, read as training reads them for the adapter's model.task (its eval_rows hook)."""
    return hooks.of(task).eval_rows(path, fmt, columns or {}, limit)


def refuse_rows_without_reference(rows: list[EvalRow], metrics: list[Metric]) -> None:
    needing = [m.name for m in metrics if m.needs in ("text", "logits")]
    missing = [r.where for r in rows if r.reference is None]
    if needing and missing:
        raise DataError(f"{missing[0]}: no reference answer (no non-empty assistant turn / output)"
                        + (f", nor in {len(missing) - 1} other rows" if len(missing) > 1 else "")
                        + f"; metrics {', '.join(needing)} compare with it",
                        "give every row its answer (alpaca 'output', or a final assistant turn), or drop those rows")


# --------------------------------------------------------------------------- what every candidate is asked

@dataclass
class Asking:
    """The rendered rows, shared by every candidate: the prompt ids (template.prompt_ids) and,
    for loss, the ids and labels of prompt + reference with the reference supervised."""
    tokenizer: object
    template: object               # the TemplateSpec
    rows: list[EvalRow]
    prompts: list[list[int]] = field(default_factory=list)
    # decoder: (prompt + reference ids, labels aligned with them); encoder-decoder: (the prompt
    # ids the encoder reads, the reference ids + EOS the decoder is scored on), as training builds them
    scored: list[tuple[list[int], list[int]]] = field(default_factory=list)

    @classmethod
    def render(cls, tokenizer, template, rows: list[EvalRow], encoder_decoder: bool = False) -> Asking:
        asking = cls(tokenizer, template, rows)
        for row in rows:
            if row.labeled is not None:
                continue
            asking.prompts.append(prompt_ids(tokenizer, template, row.messages, row.tools or None))
            if row.reference is not None and not encoder_decoder:
                full = row.messages + [{"role": "assistant", "content": row.reference}]
                segments = conversation_segments(template, full, tokenizer, tools=row.tools or None, train_on="last")
                asking.scored.append(encode_segments(tokenizer, segments))
        if encoder_decoder:

            answered = [(r.messages, r.reference) for r in rows if r.reference is not None]
            # the encoder input and labels seq2seq training builds (nothing cut: eval asks whole rows)
            examples, _ = tokenize_seq2seq(answered, tokenizer, template, max_length=sys.maxsize)
            asking.scored = [(e["input_ids"], e["labels"]) for e in examples]
        return asking

    def check_texts(self) -> list[str]:
        """Texts whose ids another tokenizer must reproduce: each checked row's prompt pieces
        and reference."""

        texts = []
        for row in self.rows[:CHECKED_ROWS]:
            if row.labeled is None:
                texts += [s.text for s in conversation_segments(self.template, row.messages, self.tokenizer,
                                                                tools=row.tools or None, add_generation_prompt=True)]
                texts += [row.reference] if row.reference else []
        return [t for t in texts if t]


@dataclass
class Settings:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    batch_size: int = 8

    def generation(self):
        return GenerationSettings(self.max_new_tokens, self.temperature, self.top_p, 1.0, self.seed)


# --------------------------------------------------------------------------- candidates

class Candidate:
    """One thing that answers. `kind` is the name in CANDIDATES and in eval.json."""
    kind = ""
    has_logits = False
    generates = True

    def __init__(self, name: str, source: str):
        self.name, self.source = name, source

    def fingerprint(self) -> dict:
        return {"source": self.source}

    def check(self, asking: Asking) -> None:
        """Refuse (exit 2) when this candidate would not be asked what the others are asked."""

    def answers(self, asking: Asking, settings: Settings, tick: Callable[[int], None]) -> list[str]:
        raise NotImplementedError

    def losses(self, asking: Asking, tick: Callable[[int], None]) -> list[tuple[float, int]]:
        raise NotImplementedError

    def labels(self, asking: Asking, tick: Callable[[int], None]) -> list[str]:
        raise LoraError(f"candidate {self.name} ({self.kind}) cannot label rows",
                        "accuracy and macro_f1 need classification adapters")


class TransformersCandidate(Candidate):
    """The base (adapter None) or an adapter, switched in place on one loaded model; or a merged
    folder, loaded on its own. Generation is the backend's batched generate."""
    has_logits = True

    def __init__(self, name: str, source: str, kind: str, backend, adapter: str | None, files: list[Path]):
        super().__init__(name, source)
        self.kind, self.backend, self.adapter, self.files = kind, backend, adapter, files

    def fingerprint(self) -> dict:
        return {"source": self.source, "sha256": files_digest(self.files)}

    def answers(self, asking, settings, tick):
        generation, out = settings.generation(), []
        for start in range(0, len(asking.prompts), settings.batch_size):
            chunk = asking.prompts[start:start + settings.batch_size]
            out += [c.text for c in self.backend.generate([GenerationRequest(ids, generation, self.adapter)
                                                           for ids in chunk])]
            tick(len(chunk))
        return out

    def losses(self, asking, tick, batch_size: int = 8):
        out = []
        with using_variant(self.backend.model, self.adapter):
            for start in range(0, len(asking.scored), batch_size):
                chunk = asking.scored[start:start + batch_size]
                out += sequence_nll(self.backend.model, self.backend.tokenizer.pad_token_id, chunk)
                tick(len(chunk))
        return out


class ClassifierCandidate(Candidate):
    """A classification adapter, asked as `lora predict` asks it (tasks.predict_probabilities)."""
    kind = "adapter"
    generates = False

    def __init__(self, name: str, source: str, model, tokenizer, labels: list[str], max_length: int, files):
        super().__init__(name, source)
        self.model, self.tokenizer, self.label_names, self.max_length, self.files = model, tokenizer, labels, max_length, files

    def fingerprint(self) -> dict:
        return {"source": self.source, "sha256": files_digest(self.files)}

    def labels(self, asking, tick):
        with using_variant(self.model, self.name):
            probs = predict_probabilities(self.model, self.tokenizer, [r.labeled for r in asking.rows], self.max_length)
        tick(len(probs))
        return [self.label_names[max(range(len(p)), key=p.__getitem__)] for p in probs]


class GGUFCandidate(Candidate):
    """A GGUF file through llama-cpp-python, given the very prompt ids the others get."""
    kind = "gguf"
    has_logits = True

    def __init__(self, name: str, source: str, context: int, seed: int):
        super().__init__(name, source)
        try:
            from llama_cpp import Llama
        except ImportError:
            raise LoraError("--gguf needs llama-cpp-python", install_hint("export")) from None
        try:
            # n_ubatch=1: on a CPU with AMX, llama.cpp repacks q8_0 (and other quantized) weights
            # for its AMX kernels, which it uses only on multi-token batches; those segfaulted in
            # decode here (tiny model, q8_0). One token per batch takes the plain vector path.
            # llama-cpp-python does not expose llama.cpp's use_extra_bufts switch to turn AMX off.
            self.llm = Llama(model_path=source, n_ctx=context, n_ubatch=1, logits_all=True, verbose=False,
                             seed=seed or 0)
        except (ValueError, RuntimeError) as e:
            raise LoraError(f"--gguf {source}: llama.cpp cannot load it ({e})",
                            "pass a model file `lora export --format gguf` wrote (not a gguf-adapter file)") from None

    def fingerprint(self) -> dict:
        return {"source": self.source, "sha256": files_digest([Path(self.source)])}

    def check(self, asking):
        texts = asking.check_texts()
        ours = tokenize_texts(asking.tokenizer, texts)
        for text, want in zip(texts, ours):
            got = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            if got != want:
                raise LoraError(f"--gguf {self.source}: its tokenizer splits {text[:60]!r} into {got[:12]} but the "
                                f"adapter's tokenizer gives {want[:12]}, so its answers would not be comparable",
                                "evaluate the GGUF exported from this adapter (`lora export --adapter DIR --format gguf`)")
        embedded = self.llm.metadata.get("tokenizer.chat_template")
        expected = jinja_chat_template(asking.template, asking.tokenizer)
        if embedded is not None and embedded != expected:
            raise LoraError(f"--gguf {self.source}: its chat template is not the one the adapter was trained with "
                            f"({asking.template.name}), so it would answer other prompts when served",
                            "export the adapter again (`lora export --adapter DIR --format gguf`), or pass --template "
                            "with the template the file was exported with")

    def answers(self, asking, settings, tick):
        """llama.cpp's own logits, one token at a time: argmax when greedy, else seeded softmax
        sampling. (This loop replaced create_completion when decode segfaulted; that crash was
        llama.cpp's AMX kernels on multi-token batches, see __init__'s n_ubatch.)"""
        import numpy as np

        rng = np.random.default_rng(settings.seed)
        eos, out = self.llm.token_eos(), []
        for ids in asking.prompts:
            self.llm.reset()
            self.llm.eval(list(ids))
            tokens: list[int] = []
            while len(tokens) < settings.max_new_tokens:
                token = _pick(np.asarray(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float64), settings, rng)
                if token == eos:
                    break
                tokens.append(token)
                self.llm.eval([token])
            out.append(self.llm.detokenize(tokens).decode("utf-8", "replace").strip())
            tick(1)
        return out

    def losses(self, asking, tick):
        import numpy as np

        out = []
        for ids, labels in asking.scored:
            self.llm.reset()
            self.llm.eval(ids)
            logits = np.asarray(self.llm.scores[:len(ids)], dtype=np.float64)
            out.append(_nll_of(logits, labels))
            tick(1)
        return out


def _pick(logits, settings: Settings, rng) -> int:
    import numpy as np

    if settings.temperature <= 0:
        return int(np.argmax(logits))
    p = np.exp((logits - logits.max()) / settings.temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), settings.top_p) + 1)]  # nucleus
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))


class EndpointCandidate(Candidate):
    """An OpenAI-compatible server (`lora serve` included): each row's conversation sent to
    /v1/chat/completions, several at once so the server can batch them."""
    kind = "endpoint"

    def __init__(self, name: str, source: str, model: str | None, api_key: str | None):
        super().__init__(name, source)
        if not source.startswith(("http://", "https://")):
            raise LoraError(f"--endpoint {source!r} is not an http(s) URL", "e.g. --endpoint http://127.0.0.1:8000")
        self.base = source.rstrip("/").removesuffix("/v1")
        self.api_key = api_key
        listed = self._models()
        if model is None and len(listed) != 1:
            raise LoraError(f"--endpoint {source} serves {', '.join(listed) or 'no models'}; which one is asked?",
                            "name it with --endpoint-model ID")
        model = model or listed[0]
        if model not in listed:
            raise LoraError(f"--endpoint-model {model!r} is not served at {source} (it serves {', '.join(listed)})",
                            "pick one of those")
        self.model = model

    def fingerprint(self) -> dict:
        return {"source": self.base, "model": self.model}

    def _call(self, path: str, body: dict | None = None) -> dict:
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            raise LoraError(f"--endpoint {self.source}: {path} answered {e.code}: {detail}",
                            "check the URL, --endpoint-model and --api-key") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise LoraError(f"--endpoint {self.source}: not an OpenAI-compatible endpoint ({path}: {e})",
                            "start one (e.g. `lora serve --adapter DIR`) and pass its URL") from None

    def _models(self) -> list[str]:
        listing = self._call("/v1/models")
        if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
            raise LoraError(f"--endpoint {self.source}: /v1/models is not an OpenAI model list",
                            "pass the URL of an OpenAI-compatible server")
        return [str(m.get("id")) for m in listing["data"] if isinstance(m, dict)]

    def _ask(self, row: EvalRow, settings: Settings) -> dict:
        body = {"model": self.model, "messages": [openai_message(m) for m in row.messages],
                "max_tokens": settings.max_new_tokens, "temperature": settings.temperature, "top_p": settings.top_p}
        if settings.seed is not None:
            body["seed"] = settings.seed
        if row.tools:
            body["tools"] = row.tools
        return self._call("/v1/chat/completions", body)

    def answers(self, asking, settings, tick):
        from concurrent.futures import ThreadPoolExecutor

        out = []
        with ThreadPoolExecutor(max_workers=settings.batch_size) as pool:
            for row, ids, reply in zip(asking.rows, asking.prompts, pool.map(lambda r: self._ask(r, settings), asking.rows)):
                used = (reply.get("usage") or {}).get("prompt_tokens")
                if used is not None and used != len(ids):
                    raise LoraError(f"--endpoint {self.source} (model {self.model}): {row.where} is {used} prompt tokens "
                                    f"there but {len(ids)} as the adapter's template ({asking.template.name}) renders it: "
                                    "the server's template or tokenizer is not the adapter's",
                                    "serve the adapter itself (`lora serve --adapter DIR`), or pass --template with the "
                                    "template the server renders")
                out.append((reply["choices"][0]["message"].get("content") or "").strip())
                tick(1)
        return out


def openai_message(m: dict) -> dict:
    """A parsed message (formats.py) in the OpenAI shape a server reads."""

    out = {"role": m["role"], "content": user_content(m) if m["role"] == "user" else m["content"]}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
                             for c in m["tool_calls"]]
    return out


CANDIDATES: dict[str, type] = {"base": TransformersCandidate, "adapter": TransformersCandidate,
                               "merged": TransformersCandidate, "gguf": GGUFCandidate,
                               "endpoint": EndpointCandidate}  # eval.json's `kind` values


def sequence_nll(model, pad_id: int, chunk: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
    """(summed NLL, tokens) of each row's supervised tokens, one right-padded forward pass. An
    encoder-decoder reads the prompt in its encoder and scores the labels in its decoder (built
    from the labels as in training), so its logits line up with the labels unshifted."""
    import torch

    width = max(len(ids) for ids, _ in chunk)
    ids = torch.tensor([x + [pad_id] * (width - len(x)) for x, _ in chunk], device=model.device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in chunk], device=model.device)
    if not getattr(model.config, "is_encoder_decoder", False):
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float().cpu()
        return [_nll_of(logits[i, :len(x)].numpy(), labels) for i, (x, labels) in enumerate(chunk)]
    longest = max(len(labels) for _, labels in chunk)
    targets = torch.tensor([y + [IGNORE_INDEX] * (longest - len(y)) for _, y in chunk], device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, labels=targets).logits.float().cpu()
    return [_nll_of(logits[i, :len(y)].numpy(), y, shift=0) for i, (_, y) in enumerate(chunk)]


def _nll_of(logits, labels: list[int], shift: int = 1) -> tuple[float, int]:
    """A decoder's position t predicts token t+1 (shift 1; labels unshifted, IGNORE_INDEX where
    unsupervised); an encoder-decoder's decoder position t predicts labels[t] (shift 0)."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    total, count = 0.0, 0
    for t in range(shift, len(labels)):
        if labels[t] == IGNORE_INDEX:
            continue
        row = logits[t - shift]
        top = row.max()
        total += float(top + np.log(np.exp(row - top).sum()) - row[labels[t]])
        count += 1
    return total, count


def files_digest(files: list[Path]) -> str:
    """sha256 over the files' names and bytes: the candidate's weights as evaluated."""
    digest = hashlib.sha256()
    for f in sorted(files):
        digest.update(f.name.encode())
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- confidence intervals

def bootstrap(stats: list, metric: Metric, draws) -> list[float]:
    return [metric.total([stats[i] for i in d]) for d in draws]


def interval(values: list[float]) -> tuple[float, float]:
    import numpy as np

    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def score(answers: dict[str, list[Answer]], metrics: list[Metric], capable: dict[str, set], baseline: str,
          resamples: int, seed: int) -> dict[str, dict]:
    """{candidate: {metric: {value, low, high, diff: {value, low, high}}}}: each candidate's
    value with a percentile bootstrap interval, and its paired difference to the baseline
    (the same resampled rows for every candidate, so shared row difficulty cancels)."""
    import numpy as np

    n = len(next(iter(answers.values())))
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n)).tolist()
    out: dict[str, dict] = {name: {} for name in answers}
    for metric in metrics:
        boots = {}
        for name, rows in answers.items():
            if metric.needs not in capable[name]:
                continue
            stats = [metric.row(a) for a in rows]
            boots[name] = bootstrap(stats, metric, draws)
            low, high = interval(boots[name])
            out[name][metric.name] = {"value": metric.total(stats), "low": low, "high": high}
        for name in boots:
            if baseline in boots:
                diffs = [a - b for a, b in zip(boots[name], boots[baseline])]
                low, high = interval(diffs)
                value = out[name][metric.name]["value"] - out[baseline][metric.name]["value"]
                out[name][metric.name]["diff"] = {"value": value, "low": low, "high": high}
    return out


# --------------------------------------------------------------------------- loading the candidates

@dataclass
class Request:
    """What `lora eval` was asked (the CLI's flags, parsed)."""
    data: str
    adapters: dict[str, str] = field(default_factory=dict)   # name -> folder
    base: bool = False              # ask the adapters' base too
    base_model: str | None = None   # the base to load (default: the adapters')
    merged: list[str] = field(default_factory=list)
    gguf: list[str] = field(default_factory=list)
    endpoint: list[str] = field(default_factory=list)
    endpoint_model: str | None = None
    api_key: str | None = None
    template: str | None = None
    metrics: list[str] | None = None
    baseline: str | None = None
    limit: int | None = None
    resamples: int = 1000
    settings: Settings = field(default_factory=Settings)

    def inputs(self) -> list[tuple[str, str]]:
        """What it reads, which --out may not be, hold or sit inside: the rows, each adapter and
        the base it names, --base-model, merged folders and GGUF files."""

        found = [("--data", self.data), ("base model (--base-model)", self.base_model)]
        for name, folder in self.adapters.items():
            found.append(("--adapter", folder))
            try:
                found.append((f"base model of adapter {name}", read_adapter(folder).base))
            except LoraError:
                pass  # a damaged adapter is refused by the loader, in its own words
        return found + [("--merged", p) for p in self.merged] + [("--gguf", p) for p in self.gguf]


def check_kinds(request: Request) -> None:
    """Each path is what its flag says, before anything loads."""
    for name, folder in request.adapters.items():
        p = Path(folder)
        if p.is_dir() and not (p / "adapter_config.json").is_file() and (p / "config.json").is_file():
            raise LoraError(f"--adapter {folder}: a full model folder (config.json, no adapter_config.json), not an adapter",
                            f"pass it with --merged {folder}")
    for folder in request.merged:
        p = Path(folder)
        if p.is_file() and _is_gguf(p):
            raise LoraError(f"--merged {folder}: a GGUF file, not a model folder", f"pass it with --gguf {folder}")
        if not p.is_dir():
            raise LoraError(f"--merged {folder}: no such folder", "give the folder `lora merge --out` wrote")
        if (p / "adapter_config.json").is_file():
            raise LoraError(f"--merged {folder}: an adapter folder, not a merged model", f"pass it with --adapter {folder}")
        if not (p / "config.json").is_file():
            raise LoraError(f"--merged {folder}: no config.json, so not a model folder", "give the folder `lora merge --out` wrote")
    for file in request.gguf:
        p = Path(file)
        if p.is_dir():
            what = "an adapter folder" if (p / "adapter_config.json").is_file() else "a folder"
            raise LoraError(f"--gguf {file}: {what}, not a GGUF file",
                            "pass adapters with --adapter, merged folders with --merged, .gguf files with --gguf")
        if not p.is_file():
            raise LoraError(f"--gguf {file}: no such file", "give the file `lora export --format gguf` wrote")
        if not _is_gguf(p):
            raise LoraError(f"--gguf {file}: not a GGUF file (it does not start with the GGUF magic)",
                            "give the file `lora export --format gguf` wrote")


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


def _weights(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json"))


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def load_candidates(request: Request) -> tuple[list[Candidate], Asking, list[Metric], str]:
    """(candidates in order, the rendered rows, the metrics, the task)."""

    check_kinds(request)
    if request.template:
        resolve_template(request.template)  # unknown names fail before anything loads
    infos = {name: read_adapter(folder) for name, folder in request.adapters.items()}
    first = next(iter(infos.values()), None)
    task = get_task(first.model_section.get("task")).name if first else _merged_task(request.merged)
    metrics = resolve_metrics(request.metrics or (CLASSIFICATION_DEFAULT if TASKS[task].predicts_labels else GENERATION_DEFAULT))
    wrong = [m.name for m in metrics if (m.needs == "labels") != TASKS[task].predicts_labels]
    if wrong:
        raise LoraError(f"--metrics {', '.join(wrong)}: not for {task} candidates",
                        "accuracy and macro_f1 are for classification adapters; the others for generating ones")
    rows = read_eval_rows(request.data, limit=request.limit, task=task,
                          columns=dict(((first.recipe or {}).get("data") or {}).get("columns") or {}) if first else {})
    refuse_rows_without_reference(rows, metrics)
    if TASKS[task].predicts_labels:
        return _classifiers(request, infos), Asking(None, None, rows), metrics, task
    return (*_generators(request, infos, rows, task), metrics, task)


def _merged_task(folders: list[str]) -> str:
    """Without an adapter, the model.task of the first merged folder: the generating task its
    config can do (a T5 or BART folder is seq2seq, a decoder causal_lm)."""

    if not folders:
        return "causal_lm"
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folders[0])
    except (OSError, ValueError):
        return "causal_lm"  # load_base_model names the unreadable folder in its own words
    return next((t.name for t in TASKS.values() if t.generates and t.can_load(config)), "causal_lm")


def _generators(request: Request, infos: dict, rows: list[EvalRow], task: str) -> tuple[list[Candidate], Asking]:
    if not infos and not request.base_model and not request.merged:
        # the prompts are rendered by an adapter's (or a model folder's) tokenizer and template
        raise LoraError("nothing to render the rows with: --gguf and --endpoint are compared with an adapter or model"
                        if request.gguf or request.endpoint else "nothing to evaluate",
                        "pass --adapter DIR (with --base for its base), --base-model MODEL or --merged DIR")
    candidates: list[Candidate] = []
    backend = None
    if infos or request.base_model:
        backend, infos = TransformersBackend.load(request.adapters, base=request.base_model)
        tokenizer = backend.tokenizer
        base_source = request.base_model or next(iter(infos.values())).base
    else:
        tokenizer = load_tokenizer(request.merged[0])
        base_source = None
    first = next(iter(infos.values()), None)
    template = resolve_template(request.template or (first.template if first else "human_assistant"))
    if backend is not None and (request.base or not infos):
        base_files = _weights(Path(base_source)) if Path(base_source).is_dir() else []
        candidates.append(TransformersCandidate("base", base_source, "base", backend, None, base_files))
    for name, info in infos.items():
        candidates.append(TransformersCandidate(name, str(info.path), "adapter", backend, name, _weights(info.path)))
    for folder in request.merged:
        merged_tokenizer = load_tokenizer(folder)
        model = load_base_model(ModelConfig(name_or_path=folder, task=task), device=local_device())
        model.eval()
        cand = TransformersCandidate(Path(folder).name or "merged", folder, "merged",
                                     TransformersBackend(model, merged_tokenizer), None, _weights(Path(folder)))
        candidates.append(cand)
    model = backend.model if backend is not None else candidates[0].backend.model
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))  # as backends.generate_batch asks
    if encoder_decoder and request.gguf:
        raise LoraError(f"--gguf {request.gguf[0]}: the candidates are encoder-decoder ({task}) models; a GGUF file "
                        "is compared with decoder-only (causal_lm) adapters", "drop --gguf")
    if backend is not None:
        refuse_overlong_rows(backend, rows)
    asking = Asking.render(tokenizer, template, rows, encoder_decoder=encoder_decoder)
    if backend is not None:
        refuse_rows_over_context(backend, asking, request.settings.max_new_tokens)
    for folder, cand in zip(request.merged, [c for c in candidates if c.kind == "merged"]):
        _check_same_tokenizer(asking, cand.backend.tokenizer, f"--merged {folder}")
    context = max((len(ids) for ids, _ in asking.scored), default=0) + request.settings.max_new_tokens + 8
    context = max(context, max((len(p) for p in asking.prompts), default=0) + request.settings.max_new_tokens + 8)
    for file in request.gguf:
        candidates.append(GGUFCandidate(Path(file).stem, file, context, request.settings.seed or 0))
    for url in request.endpoint:
        candidates.append(EndpointCandidate("endpoint", url, request.endpoint_model, request.api_key))
    for cand, name in zip(candidates, _unique([c.name for c in candidates])):
        cand.name = name
    for cand in candidates:
        cand.check(asking)
    return candidates, asking


def refuse_overlong_rows(backend, rows: list[EvalRow]) -> None:
    """A row whose characters alone hold more tokens than the model's context (a 10 MB question)
    is refused naming it before anything tokenises it, as `lora generate` refuses a prompt."""

    for row in rows:
        chars = sum(len(m.get("content") or "") + len(m.get("input") or "") for m in row.messages
                    if isinstance(m.get("content") or "", str))
        refuse_overlong_text(backend, chars + tools_chars(row.tools) + len(row.reference or ""), row.where)


def refuse_rows_over_context(backend, asking: Asking, max_new_tokens: int) -> None:
    """Prompt + answer of every row must fit the model's context (as `lora generate` requires)."""

    asked = [row for row in asking.rows if row.labeled is None]
    for row, ids in zip(asked, asking.prompts):
        refuse_over_context(backend, len(ids), max_new_tokens, row.where)


def _check_same_tokenizer(asking: Asking, other, flag: str) -> None:
    texts = asking.check_texts()
    for text, want, got in zip(texts, tokenize_texts(asking.tokenizer, texts), tokenize_texts(other, texts)):
        if want != got:
            raise LoraError(f"{flag}: its tokenizer splits {text[:60]!r} into {got[:12]} but the adapter's gives "
                            f"{want[:12]}, so it would be asked other prompts",
                            "evaluate the folder `lora merge` wrote from this adapter")
    if other.eos_token_id != asking.tokenizer.eos_token_id:
        raise LoraError(f"{flag}: its end-of-answer token ({other.eos_token!r}) is not the adapter's "
                        f"({asking.tokenizer.eos_token!r})", "evaluate the folder `lora merge` wrote from this adapter")


def _classifiers(request: Request, infos: dict) -> list[Candidate]:
    if request.base or request.merged or request.gguf or request.endpoint:
        raise LoraError("classification adapters are compared with each other only (--adapter ...)",
                        "drop --base / --merged / --gguf / --endpoint; a base has no trained label head")
    model, tokenizer, infos = load_for_inference(request.adapters, base=request.base_model)
    return [ClassifierCandidate(name, str(info.path), model, tokenizer, list(info.model_section["labels"]),
                                int((info.recipe or {}).get("data", {}).get("max_length", 512)), _weights(info.path))
            for name, info in infos.items()]


# --------------------------------------------------------------------------- running

def capabilities(candidate: Candidate) -> set[str]:
    if not candidate.generates:
        return {"labels"}
    return {"text"} | ({"logits"} if candidate.has_logits else set())


def ask_all(candidates: list[Candidate], asking: Asking, metrics: list[Metric], settings: Settings
            ) -> dict[str, list[Answer]]:
    """Every candidate's Answer per row, for the metrics asked. Progress (lora_cli.ui.progress,
    `lora eval`'s bar) counts rows x passes over every candidate, noting which one is asked."""
    needs = {m.needs for m in metrics}
    # a pass over the rows per kind of answer both asked for and given (text, logits, labels)
    progress.set_total(len(asking.rows) * sum(len(needs & capabilities(c)) for c in candidates))
    tick = progress.advance
    out = {}
    for cand in candidates:
        can = capabilities(cand)
        progress.note(f"asking {cand.name} ({len(asking.rows)} rows)")
        answers = [Answer(reference=r.reference, label=r.label) for r in asking.rows]
        if "text" in needs and "text" in can:
            for a, text in zip(answers, cand.answers(asking, settings, tick)):
                a.text = text
        if "logits" in needs and "logits" in can:
            for a, (nll, n) in zip(answers, cand.losses(asking, tick)):
                a.nll, a.tokens = nll, n
        if "labels" in needs and "labels" in can:
            for a, label in zip(answers, cand.labels(asking, tick)):
                a.predicted = label
        out[cand.name] = answers
    return out


def run_eval(request: Request, out: Path | None = None, force: bool = False,
             log: Callable[[str], None] = print) -> dict:
    """Load, ask, score; write OUT/eval.json, answers.jsonl and eval.png when `out` is given.
    Returns the eval.json record."""

    if out is not None:  # the one output rule: never over an input, replaced only with --force and only if eval wrote it
        ownership.check_output(Path(out), "eval", force=force, folder=True, inputs=request.inputs())
    progress.note("loading the candidates")
    candidates, asking, metrics, task = load_candidates(request)
    names = [c.name for c in candidates]
    baseline = request.baseline or names[0]
    if baseline not in names:
        raise LoraError(f"--baseline {baseline!r} is not a candidate", f"candidates: {', '.join(names)}")
    answers = ask_all(candidates, asking, metrics, request.settings)
    scores = score(answers, metrics, {c.name: capabilities(c) for c in candidates}, baseline,
                   request.resamples, request.settings.seed or 0)
    record = eval_record(request, candidates, asking, metrics, scores, baseline, task)
    if out is not None:
        write_outputs(Path(out), record, answer_rows(candidates, asking, answers), force)
    return record


def eval_record(request, candidates, asking, metrics, scores, baseline, task) -> dict:
    """eval.json: the stable layout scripts read (LAYOUT_VERSION changes when it does)."""
    return {
        "version": LAYOUT_VERSION,
        "baseline": baseline,
        "candidates": [{"name": c.name, "kind": c.kind, "fingerprint": c.fingerprint(), "metrics": scores[c.name]}
                       for c in candidates],
        "metrics": {m.name: {"doc": m.doc, "higher_is_better": m.higher_is_better} for m in metrics},
        "settings": {"data": str(request.data), "rows": len(asking.rows), "limit": request.limit, "task": task,
                     "template": asking.template.as_dict() if asking.template is not None else None,
                     "max_new_tokens": request.settings.max_new_tokens, "temperature": request.settings.temperature,
                     "top_p": request.settings.top_p, "seed": request.settings.seed,
                     "batch_size": request.settings.batch_size, "bootstrap_resamples": request.resamples,
                     "confidence": CONFIDENCE},
    }


def answer_rows(candidates, asking: Asking, answers: dict[str, list[Answer]]) -> list[dict]:
    rows = []
    for i, row in enumerate(asking.rows):
        prompt = asking.tokenizer.decode(asking.prompts[i]) if asking.prompts else None
        for c in candidates:
            a = answers[c.name][i]
            rows.append({"row": i, "where": row.where, "candidate": c.name, "kind": c.kind, "prompt": prompt,
                         "reference": a.reference, "answer": a.text, "nll": a.nll, "tokens": a.tokens,
                         "label": a.label, "predicted": a.predicted})
    return rows


def write_outputs(out: Path, record: dict, rows: list[dict], force: bool) -> None:
    with ownership.writing_folder(out, "eval", force) as staging:
        (staging / EVAL_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
        (staging / ANSWERS_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8")
        plot_scores(record, staging / PLOT_FILE)


def plot_scores(record: dict, png: Path) -> Path | None:
    """One panel per metric: a bar per candidate, its interval as the error bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metrics = list(record["metrics"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4), dpi=100, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        shown = [(c["name"], c["metrics"][metric]) for c in record["candidates"] if metric in c["metrics"]]
        values = [s["value"] for _, s in shown]
        errors = [[max(0.0, s["value"] - s["low"]) for _, s in shown], [max(0.0, s["high"] - s["value"]) for _, s in shown]]
        ax.bar(range(len(shown)), values, yerr=errors, capsize=4, color="tab:blue")
        ax.set_xticks(range(len(shown)), [n for n, _ in shown], rotation=30, ha="right")
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, format="png")
    plt.close(fig)
    return png


def format_cell(entry: dict | None, is_baseline: bool) -> str:
    """value, its interval, and (not for the baseline) Δ and its interval: one short line each,
    so a column stays narrow however many metrics there are."""
    if entry is None:
        return "n/a"
    lines = [f"{entry['value']:.4g}", f"[{entry['low']:.3g}, {entry['high']:.3g}]"]
    diff = entry.get("diff")
    if diff is not None and not is_baseline:
        lines += [f"Δ {diff['value']:+.3g}", f"[{diff['low']:+.3g}, {diff['high']:+.3g}]"]
    return "\n".join(lines)


def print_table(record: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"{record['settings']['rows']} rows of {record['settings']['data']}; "
                        f"Δ = difference to {record['baseline']}, [{CONFIDENCE:.0%} bootstrap interval]",
                  box=table_box())  # piped / NO_COLOR: no box drawing
    table.add_column("candidate", overflow="fold")  # a long name (an endpoint's URL) wraps, never ends in "…"
    table.add_column("kind")
    for metric, about in record["metrics"].items():
        table.add_column(metric + (" ↑" if about["higher_is_better"] else " ↓"), justify="right")
    for c in record["candidates"]:
        table.add_row(c["name"], c["kind"], *[format_cell(c["metrics"].get(m), c["name"] == record["baseline"])
                                              for m in record["metrics"]])
    console.print(table)


# --------------------------------------------------------------------------- at the end of `lora train`

def evaluate_trained(recipe, model, tokenizer, log: Callable[[str], None]) -> dict[str, dict]:
    """eval.metrics of the recipe on its validation split, by the model just trained (its
    answers generated through the backend, as `lora eval` asks an adapter). Returns
    {metric: {value, low, high}}; nothing when the recipe asks for none or has no eval split."""

    names = list(recipe.eval.metrics)
    rows = hooks.of(recipe.model.task).held_out_rows(recipe) if names else None
    if rows is None:  # a task eval.metrics does not apply to: recipe checks refuse it elsewhere
        return {}
    if not rows:
        log("eval.metrics skipped: no validation split (set data.val_fraction or data.val_path)")
        return {}
    if recipe.eval.limit:
        rows = rows[:recipe.eval.limit]
    rows = [r for r in rows if r.reference is not None and r.messages and r.messages[-1]["role"] in ("user", "tool")]
    metrics = resolve_metrics(names, "eval.metrics")
    if not rows:
        log("eval.metrics skipped: no validation row has a question and an answer")
        return {}
    was_training = model.training
    model.eval()
    try:
        asking = Asking.render(tokenizer, TemplateSpec.from_data(recipe.data), rows,
                               encoder_decoder=bool(getattr(model.config, "is_encoder_decoder", False)))
        cand = TransformersCandidate("trained", str(recipe.output_dir), "adapter", TransformersBackend(model, tokenizer),
                                     None, [])
        cand.adapter = _active(model)
        settings = Settings(max_new_tokens=recipe.eval.max_new_tokens, seed=recipe.train.seed)
        answers = ask_all([cand], asking, metrics, settings)
    finally:
        model.train(was_training)
    scores = score(answers, metrics, {"trained": capabilities(cand)}, "trained", recipe.eval.bootstrap_resamples,
                   recipe.train.seed)
    return {name: {k: v for k, v in entry.items() if k != "diff"} for name, entry in scores["trained"].items()}


def _active(model):
    return active_adapter(model)
