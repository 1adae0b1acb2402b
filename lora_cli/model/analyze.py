"""`lora analyze`: what a trained LoRA adapter actually learned, module by module.

For each adapted module the update is dW = scaling * B @ A (scaling = alpha / r, or
alpha / sqrt(r) with rsLoRA). Its singular values say how many of the r directions the
update really uses: the effective rank at 90% / 99% of the energy (sum of squared singular
values), and the stable rank ||dW||_F^2 / ||dW||_2^2, a smooth count of the dominant
directions. ||dW||_F / ||W||_F says how far the adapter moved the frozen weight.

If most modules fit 99% of their update in half the rank or less, the rank is
over-provisioned; if most need nearly all of it for 90%, a larger rank may help (confirm
either with `lora sweep`).
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from lora_cli.model.adapter_folder import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, find_recipe_file, read_adapter,
                                          verify_adapter)
from lora_cli.files import ownership
from lora_cli.errors import LoraError
from lora_cli.model.methods import RANKED, for_peft_type
from lora_cli.model.load import inference_model_config, load_base_model
from lora_cli.ui.terminal import plain
from lora_cli.libraries import install_hint

FULL_SHARE = 0.75   # eff. rank (90%) at this share of r or more: the module uses its whole rank
LOW_SHARE = 0.5     # eff. rank (99%) at this share of r or less: half the rank would do
MAJORITY = 0.5      # share of modules that decides the verdict


@dataclass
class ModuleAnalysis:
    name: str                    # module name in the base model, e.g. model.layers.0.self_attn.q_proj
    rank: int
    scaling: float
    singular_values: list[float]  # of scaling * B @ A, largest first (r of them)
    update_norm: float           # ||dW||_F
    weight_norm: float | None = None  # ||W||_F of the frozen base weight

    def effective_rank(self, energy: float) -> int:
        """Fewest singular directions holding `energy` of the update's squared Frobenius norm."""
        squares = [s * s for s in self.singular_values]
        total = sum(squares)
        if total == 0:
            return 0
        running = 0.0
        for k, sq in enumerate(squares, 1):
            running += sq
            if running >= energy * total * (1 - 1e-9):
                return k
        return len(squares)

    @property
    def stable_rank(self) -> float:
        top = self.singular_values[0] if self.singular_values else 0.0
        return sum(s * s for s in self.singular_values) / (top * top) if top > 0 else 0.0

    @property
    def relative_norm(self) -> float | None:
        return self.update_norm / self.weight_norm if self.weight_norm else None

    @property
    def short(self) -> str:
        """'L3.q_proj' for plots and tables."""
        layer = re.search(r"\.(\d+)\.", f".{self.name}.")
        return f"L{layer.group(1)}.{self.name.rsplit('.', 1)[-1]}" if layer else self.name


@dataclass
class AdapterAnalysis:
    path: Path
    modules: list[ModuleAnalysis]
    full_modules: list[str] = field(default_factory=list)  # modules_to_save: trained whole, not low-rank
    verdict: str = ""            # "over", "under", "about right", "zero"
    suggested_rank: int | None = None
    summary: str = ""


# --------------------------------------------------------------------------- reading

def read_lora_config(path: Path) -> dict:
    verify_adapter(path)  # the same checks and messages as every other command that takes an adapter
    config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    kind = str(config.get("peft_type", "LORA")).upper()
    method = for_peft_type(kind)
    if method is None or not method.has_rank:
        raise LoraError(f"{path}: {kind} adapters have no low-rank update B·A to analyse",
                        f"lora analyze reads adapters of the methods with a rank: {', '.join(RANKED)}")
    return config


def read_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        raise LoraError(f"{path}: no {ADAPTER_WEIGHTS}", "pass a folder written by `lora train` or `lora save`")
    return load_file(str(file), device="cpu")


def _pattern_value(patterns: dict, name: str, default):
    """peft's rank_pattern / alpha_pattern: a key matches a module name ending in it (regex)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{pattern}$", name):
            return value
    return default


def lora_pairs(weights: dict) -> dict[str, tuple]:
    """module name -> (A, B) as saved by peft: base_model.model.<name>.lora_A.weight, or
    lora_embedding_A / _B for embeddings (stored transposed; same singular values)."""
    pairs: dict[str, dict] = {}
    for key, tensor in weights.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_(embedding_)?([AB])(?:\.weight)?", key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(3)] = tensor
    missing = [name for name, ab in pairs.items() if set(ab) != {"A", "B"}]
    if missing:
        raise LoraError(f"adapter weights for {missing[0]} have only lora_{next(iter(pairs[missing[0]]))}",
                        "the adapter file is incomplete; export it again with `lora save`")
    return {name: (ab["A"], ab["B"]) for name, ab in sorted(pairs.items(), key=lambda kv: _natural(kv[0]))}


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------- the spectrum

def update_singular_values(A, B, scaling: float) -> list[float]:
    """Singular values of scaling * B @ A without forming the (out x in) matrix: with B = Qb Rb
    and A^T = Qa Ra, B @ A = Qb (Rb Ra^T) Qa^T, so they are those of the r x r core."""
    import torch

    A = A.double()
    B = B.double()
    if A.shape[0] != B.shape[1]:  # embeddings save A as (r, vocab) and B as (dim, r) too; fall back
        A, B = A.T, B.T
    _, rb = torch.linalg.qr(B)
    _, ra = torch.linalg.qr(A.T)
    core = rb @ ra.T
    return [float(s) * abs(scaling) for s in torch.linalg.svdvals(core)]


def analyze_adapter(path: str | Path, *, base: str | None = None, with_base: bool = True,
                    trust_remote_code: bool = False) -> AdapterAnalysis:
    path = Path(path)
    config = read_lora_config(path)
    weights = read_weights(path)
    pairs = lora_pairs(weights)
    if not pairs:
        raise LoraError(f"{path}: the adapter holds no lora_A / lora_B weights", "is this a LoRA adapter?")
    modules = []
    for name, (A, B) in pairs.items():
        r = A.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", r))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        values = update_singular_values(A, B, scaling)
        modules.append(ModuleAnalysis(name, r, scaling, values, math.sqrt(sum(v * v for v in values))))
    if with_base:
        attach_base_norms(path, modules, base, trust_remote_code)
    full = sorted({re.sub(r"^base_model\.model\.", "", k).rsplit(".", 1)[0] for k in weights if ".lora_" not in k})
    analysis = AdapterAnalysis(path, modules, full_modules=full)
    judge(analysis)
    return analysis


def attach_base_norms(path: Path, modules: list[ModuleAnalysis], base: str | None,
                      trust_remote_code: bool = False) -> None:
    """||W||_F of each adapted module's frozen weight, from the base loaded through the same
    path inference uses (full precision, so 4-bit bases are measured dequantised)."""
    import torch

    model_cfg = inference_model_config(read_adapter(path), base, trust_remote_code=trust_remote_code)
    model = load_base_model(model_cfg, quantize=False, dtype=torch.float32, device="cpu")
    for m in modules:
        try:
            weight = model.get_submodule(m.name).weight
        except AttributeError:
            raise LoraError(f"the base {model_cfg.name_or_path} has no module {m.name} (the adapter adapts it)",
                            "pass the base the adapter was trained on with --base, or --no-base to skip the norms") from None
        m.weight_norm = float(torch.linalg.matrix_norm(weight.detach().double()))


# --------------------------------------------------------------------------- the verdict

def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def sweep_command(adapter: Path, r: int) -> str:
    """The sweep around rank r, runnable as printed: the recipe saved with the adapter (a
    checkpoint's is its run's), into a folder beside the run rather than inside it."""
    recipe = find_recipe_file(Path(adapter))
    ranks = f"--ranks {r},{2 * r},{4 * r}"
    if recipe is None:  # weights alone: only the user knows the recipe
        return f"lora sweep RECIPE {ranks}"
    out = recipe.parent.with_name(recipe.parent.name + "-sweep")
    return f"lora sweep {shlex.quote(str(recipe))} {ranks} --set output_dir={shlex.quote(str(out))}"


def judge(a: AdapterAnalysis) -> None:
    mods = a.modules
    live = [m for m in mods if m.update_norm > 0]
    if not live:
        a.verdict, a.summary = "zero", ("every update B·A is zero: the adapter has not been trained "
                                        "(B starts at zero and no step has changed it)")
        return
    ranks = sorted({m.rank for m in mods})
    r = max(ranks)
    full = sum(1 for m in live if m.effective_rank(0.9) >= math.ceil(FULL_SHARE * m.rank)) / len(live)
    low = sum(1 for m in live if m.effective_rank(0.99) <= LOW_SHARE * m.rank) / len(live)
    needed = max(m.effective_rank(0.99) for m in live)
    if full >= MAJORITY:
        a.verdict, a.suggested_rank = "under", 2 * r
        a.summary = (f"under-provisioned: {100 * full:.0f}% of modules need {100 * FULL_SHARE:.0f}% or more of "
                     f"their rank for 90% of the update's energy; the rank may be limiting. "
                     f"Try r={2 * r}; a rank sweep confirms it (try: {sweep_command(a.path, r)}).")
    elif low >= MAJORITY and _power_of_two_at_least(needed) < r:
        suggested = _power_of_two_at_least(needed)
        a.verdict, a.suggested_rank = "over", suggested
        a.summary = (f"over-provisioned: in {100 * low:.0f}% of modules 99% of the update fits in half the "
                     f"rank or less (at most {needed} of r={r} directions anywhere). "
                     f"r={suggested} would likely do as well with {r // suggested}x fewer parameters.")
    else:
        a.verdict = "about right"
        a.summary = (f"about right: the updates use a good part of r={r} without filling it "
                     f"(99% of the energy needs up to {needed} directions).")


# --------------------------------------------------------------------------- output

def print_analysis(a: AdapterAnalysis, console) -> None:
    from rich.table import Table

    from rich import box

    table = Table(title=f"{a.path}: {len(a.modules)} adapted modules (rank90/99: effective rank at 90/99% "
                        "of the energy; dW/W: ||dW||_F / ||W||_F)", title_justify="left", box=box.MARKDOWN if plain() else box.SIMPLE_HEAD, padding=(0, 1), pad_edge=plain())  # piped: '| cell |' as Markdown writes it
    for col in ("module", "r", "rank90", "rank99", "stable", "|dW|_F", "dW/W", "σ1 σ2 σ3"):
        table.add_column(col, justify="left" if col in ("module", "σ1 σ2 σ3") else "right",
                         no_wrap=col in ("module", "σ1 σ2 σ3"))
    for m in a.modules:
        rel = "-" if m.relative_norm is None else f"{m.relative_norm:.3g}"
        top = " ".join(f"{s:.2g}" for s in m.singular_values[:3])
        table.add_row(m.short, str(m.rank), str(m.effective_rank(0.9)), str(m.effective_rank(0.99)),
                      f"{m.stable_rank:.2f}", f"{m.update_norm:.3g}", rel, top)
    console.print(table)
    if a.full_modules:
        console.print(f"[bold]trained in full[/] (modules_to_save, not analysed): {', '.join(a.full_modules)}")
    console.print(f"[bold]verdict[/] {a.summary}")


def plot_analysis(a: AdapterAnalysis, out: Path) -> Path | None:
    """Per-module effective ranks and stable rank against r, and the relative update norm."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:

        raise LoraError("--plot needs matplotlib, which is not installed", install_hint("plot")) from None
    labels = [m.short for m in a.modules]
    x = list(range(len(labels)))
    has_norms = any(m.relative_norm is not None for m in a.modules)
    fig, axes = plt.subplots(2 if has_norms else 1, 1, figsize=(max(7, 0.3 * len(labels)), 6 if has_norms else 3.5),
                             dpi=100, sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.plot(x, [m.effective_rank(0.9) for m in a.modules], marker="o", label="effective rank (90%)")
    ax.plot(x, [m.effective_rank(0.99) for m in a.modules], marker="^", label="effective rank (99%)")
    ax.plot(x, [m.stable_rank for m in a.modules], marker="s", linestyle="--", label="stable rank")
    ax.step(x, [m.rank for m in a.modules], where="mid", color="black", linewidth=1, label="r")
    ax.set_ylabel("directions used")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{a.path.name}: {a.summary.split(':')[0]}")
    ax.legend(fontsize="small")
    if has_norms:
        ax2 = axes[1][0]
        ax2.bar(x, [m.relative_norm or 0 for m in a.modules], color="tab:gray")
        ax2.set_ylabel("||dW||_F / ||W||_F")
    bottom = axes[-1][0]
    bottom.set_xticks(x, labels, rotation=90, fontsize="small")
    fig.tight_layout()
    out = Path(out)
    try:
        with ownership.writing_file(out, "analyze", "--plot") as tmp:  # a reader never sees half a PNG
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out
