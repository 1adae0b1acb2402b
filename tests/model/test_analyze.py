"""`lora analyze`: adapters built with a known update spectrum, saved by peft, read back."""

from __future__ import annotations

import json
import math

import pytest

R, ALPHA = 8, 16  # scaling 2


def flat(text: str) -> str:
    """Output with line wrapping undone: the console may wrap long lines at any width."""
    return " ".join(text.split())


def _orthonormal(rows: int, cols: int, seed: int):
    import torch

    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _set_update(module, singular_values: list[float], seed: int, scaling: float) -> None:
    """Make scaling * B @ A = U diag(s) V^T with exactly len(s) non-zero singular values.
    The rows of A beyond len(s) stay random: B's matching columns are zero, so they add nothing."""
    import torch

    A = module.lora_A["default"].weight
    B = module.lora_B["default"].weight
    k = len(singular_values)
    U = _orthonormal(B.shape[0], k, seed)
    V = _orthonormal(A.shape[1], k, seed + 1)
    with torch.no_grad():
        B.zero_()
        B[:, :k] = (U * torch.tensor(singular_values, dtype=torch.float64) / scaling).float()
        A[:k] = V.T.float()


def _adapter(tmp_path, base_dir, spectra: dict[str, list[float]], name: str, **lora):
    """Save a peft adapter over base_dir whose module `full name` -> update spectrum is given."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], **lora)
    peft_model = get_peft_model(model, config)
    scaling = ALPHA / math.sqrt(R) if lora.get("use_rslora") else ALPHA / R
    for i, (module_name, values) in enumerate(spectra.items()):
        _set_update(peft_model.base_model.model.get_submodule(module_name), values, 10 * i, scaling)
    out = tmp_path / name
    peft_model.save_pretrained(out)
    return out


def _base_norm(base_dir, module_name: str) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    return float(model.get_submodule(module_name).weight.double().norm())


def _spectra(q: list[list[float]], v: list[list[float]]) -> dict[str, list[float]]:
    spectra = {}
    for layer, values in enumerate(q):
        spectra[f"model.layers.{layer}.self_attn.q_proj"] = values
    for layer, values in enumerate(v):
        spectra[f"model.layers.{layer}.self_attn.v_proj"] = values
    return spectra


def test_low_rank_updates_are_found_and_called_over_provisioned(tmp_path, tiny_random):
    from lora_cli.model.analyze import analyze_adapter

    # energies 9, 4, 1 of 14: 64% / 93% / 100% -> rank 2 at 90%, 3 at 99%; stable rank 14/9
    spectra = _spectra(q=[[3, 2, 1], [4]], v=[[1, 0.5], [2, 1, 1]])
    path = _adapter(tmp_path, tiny_random, spectra, "low")
    a = analyze_adapter(path)

    by_name = {m.name: m for m in a.modules}
    assert set(by_name) == set(spectra)
    q0 = by_name["model.layers.0.self_attn.q_proj"]
    assert q0.rank == R and q0.scaling == ALPHA / R
    assert q0.singular_values[:3] == pytest.approx([3, 2, 1], rel=1e-5)
    assert max(q0.singular_values[3:]) < 1e-5
    assert (q0.effective_rank(0.9), q0.effective_rank(0.99)) == (2, 3)
    assert q0.stable_rank == pytest.approx(14 / 9, rel=1e-5)
    assert q0.update_norm == pytest.approx(math.sqrt(14), rel=1e-5)
    assert q0.relative_norm == pytest.approx(math.sqrt(14) / _base_norm(tiny_random, q0.name), rel=1e-5)
    q1 = by_name["model.layers.1.self_attn.q_proj"]
    assert (q1.effective_rank(0.9), q1.effective_rank(0.99), q1.stable_rank) == (1, 1, pytest.approx(1))
    v0 = by_name["model.layers.0.self_attn.v_proj"]  # energies 1, 0.25: 80% -> 2 at 90%
    assert (v0.effective_rank(0.9), v0.effective_rank(0.99)) == (2, 2)

    assert a.verdict == "over"
    assert a.suggested_rank == 4  # at most 3 directions anywhere -> the next power of two


def test_flat_full_rank_updates_are_called_under_provisioned(tmp_path, tiny_random):
    from lora_cli.model.analyze import analyze_adapter

    flat = [1.0] * R  # every direction equal: 90% of the energy needs all 8 (7/8 = 87.5%)
    path = _adapter(tmp_path, tiny_random, _spectra(q=[flat, flat], v=[flat, flat]), "flat")
    a = analyze_adapter(path, with_base=False)
    assert all(m.effective_rank(0.9) == m.effective_rank(0.99) == R for m in a.modules)
    assert all(m.stable_rank == pytest.approx(R) for m in a.modules)
    assert all(m.relative_norm is None for m in a.modules)
    assert a.verdict == "under" and a.suggested_rank == 2 * R
    # weights without a saved recipe: the sweep hint names the recipe as the one thing to fill in
    assert a.summary.endswith(f"(try: lora sweep RECIPE --ranks {R},{2 * R},{4 * R}).")


def test_rslora_scaling_and_modules_to_save(tmp_path, tiny_random):
    """rsLoRA multiplies by alpha / sqrt(r); embed_tokens saved whole is reported, not analysed."""
    from lora_cli.model.analyze import analyze_adapter

    spectra = _spectra(q=[[3, 2, 1]], v=[])
    path = _adapter(tmp_path, tiny_random, spectra, "rs", use_rslora=True, modules_to_save=["embed_tokens"])
    a = analyze_adapter(path, with_base=False)
    q0 = next(m for m in a.modules if m.name == "model.layers.0.self_attn.q_proj")
    assert q0.scaling == pytest.approx(ALPHA / math.sqrt(R))
    assert q0.singular_values[:3] == pytest.approx([3, 2, 1], rel=1e-5)
    assert a.full_modules == ["model.embed_tokens"]


def test_untrained_adapter_is_reported_as_zero(tmp_path, tiny_random):
    from lora_cli.model.analyze import analyze_adapter

    path = _adapter(tmp_path, tiny_random, {}, "fresh")  # peft's start: B = 0
    a = analyze_adapter(path, with_base=False)
    assert a.verdict == "zero"
    assert all(m.effective_rank(0.9) == 0 and m.update_norm == 0 for m in a.modules)


def test_cli_prints_table_verdict_and_writes_plot(cli, tmp_path, tiny_random):
    path = _adapter(tmp_path, tiny_random, _spectra(q=[[3, 2, 1], [4]], v=[[1, 0.5], [2, 1, 1]]), "low")
    plot = tmp_path / "plots" / "analysis.png"
    res = cli("analyze", path, "--plot", plot)
    assert res.code == 0, res
    assert "\n| module    | r | rank90 |" in res.out, res.out  # piped: a Markdown table, cells padded from the pipes
    out = flat(res.out.replace("|", " "))
    assert "L0.q_proj 8 2 3 1.56" in out  # r, effective ranks 90/99%, stable rank 14/9
    assert "over-provisioned" in out and "r=4 would likely do" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_not_an_adapter_and_not_lora_are_clear_errors(cli, tmp_path, tiny_random):
    res = cli("analyze", tmp_path)
    assert res.code == 2
    assert "no adapter_config.json, so this is not an adapter folder" in flat(res.err)

    path = _adapter(tmp_path, tiny_random, {}, "fresh")
    config = json.loads((path / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    (path / "adapter_config.json").write_text(json.dumps(config))
    res = cli("analyze", path)
    assert res.code == 2
    assert "IA3 adapters have no low-rank update" in flat(res.err)
