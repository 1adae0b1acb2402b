"""`lora sweep`: one run per rank with alpha following alpha / r, the knee, resume after an interruption."""

from __future__ import annotations

import json

import pytest

from conftest import make_recipe


def flat(text: str) -> str:
    """Output with line wrapping undone: the console may wrap long lines at any width."""
    return " ".join(text.split())


def test_interrupted_sweep_keeps_finished_ranks_and_resumes(cli, tmp_path, tiny_random, monkeypatch):
    import lora_cli.train.run

    from lora_cli.model.adapter_folder import ADAPTER_WEIGHTS as ADAPTER_FILE
    from lora_cli.train.sweep import PLOT_FILE, RESULT_FILE, SUMMARY_FILE

    # make_recipe: r=4, alpha=8 (alpha / r = 2), q_proj + v_proj, max_steps 2
    recipe = make_recipe(tmp_path, tiny_random)
    extra = ["--set", "data.val_fraction=0.25"]
    out = tmp_path / "run"

    real_run_training = lora_cli.train.run.run_training

    def interrupted_at_rank_4(r, **kwargs):
        if r.lora.r == 4:
            raise KeyboardInterrupt
        return real_run_training(r, **kwargs)

    monkeypatch.setattr(lora_cli.train.run, "run_training", interrupted_at_rank_4)
    first = cli("sweep", recipe, "--ranks", "4,2", *extra)
    assert first.code == 130, first
    assert "finished ranks kept: 2" in flat(first.out)
    assert (out / "r2" / ADAPTER_FILE).is_file() and (out / "r2" / RESULT_FILE).is_file()
    assert not (out / "r4" / RESULT_FILE).exists()
    r2_written = (out / "r2" / ADAPTER_FILE).stat().st_mtime_ns

    monkeypatch.setattr(lora_cli.train.run, "run_training", real_run_training)
    second = cli("sweep", recipe, "--ranks", "2,4", *extra)
    assert second.code == 0, second
    assert "rank 2 finished earlier" in flat(second.out)
    assert (out / "r2" / ADAPTER_FILE).stat().st_mtime_ns == r2_written  # not trained again

    for rank in (2, 4):
        config = json.loads((out / f"r{rank}" / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (rank, 2 * rank)  # alpha follows alpha / r = 2
        record = json.loads((out / f"r{rank}" / RESULT_FILE).read_text())
        # the tiny model: 2 layers x (q_proj 64->64 + v_proj 64->32) = 224 parameters per rank per layer
        assert record["trainable"] == 2 * 224 * rank
        assert record["steps"] == 2
        assert record["loss"] > 0
        assert record["loss_kind"] == ("eval" if extra else "train")
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert [r["rank"] for r in summary["runs"]] == [2, 4]
    assert (out / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 2 | 4 | 896 |" in flat(second.out) and "| 4 | 8 | 1,792 |" in flat(second.out)  # piped: Markdown table

    # Same ranks, changed recipe: the finished runs are not silently reused.
    changed = cli("sweep", recipe, "--ranks", "2,4", *extra, "--set", "train.learning_rate=5e-4")
    assert changed.code == 2
    assert "different recipe (changed: train.learning_rate)" in flat(changed.err)


def _runs(losses: dict[int, float]):
    from lora_cli.train.sweep import RankRun

    return [RankRun(r, 2 * r, f"r{r}", 100 * r, 1000, loss, "eval", 2) for r, loss in losses.items()]


@pytest.mark.parametrize("losses, knee", [
    ({4: 2.0, 8: 1.5, 16: 1.2, 32: 1.19, 64: 1.185}, 16),   # flattens after 16
    ({4: 2.0, 8: 1.5, 16: 1.2, 32: 1.0, 64: 0.8}, None),     # still improving: sweep higher
    ({4: 2.0, 8: 1.99, 16: 1.5, 32: 1.49}, 16),              # a plateau that later breaks is no knee
    ({4: 1.0, 8: 1.1, 16: 1.2}, 4),                          # larger ranks only get worse
    ({8: 1.0}, None),                                        # nothing to compare
])
def test_knee_is_the_smallest_rank_after_which_doubling_stops_paying(losses, knee):
    from lora_cli.train.sweep import find_knee

    assert find_knee(_runs(losses), threshold=0.02) == knee


def test_the_sweep_table_names_every_column_and_marks_the_knee_in_words():
    """Piped, the table is Markdown: every column has a header (the last one, `note`, was blank)."""
    from rich.console import Console

    from lora_cli.train.sweep import SweepResult, print_sweep

    console = Console(width=120, force_terminal=False, color_system=None, record=True)
    runs = _runs({4: 2.0, 8: 1.5, 16: 1.2, 32: 1.19})
    runs[0].reused = True
    print_sweep(SweepResult(runs, knee=16, threshold=0.02), console)
    lines = [line for line in console.export_text().splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["rank", "alpha", "trainable", "eval loss", "gain/doubling", "note"]
    assert {row[0]: row[-1] for row in cells[2:]} == {"4": "reused", "8": "", "16": "knee", "32": ""}


def test_gain_is_measured_per_doubling():
    """4 -> 16 is two doublings: a 10% drop there is 5% per doubling."""
    from lora_cli.train.sweep import improvement_per_doubling

    assert improvement_per_doubling(_runs({4: 1.0, 16: 0.9})) == [pytest.approx(0.05)]


@pytest.mark.parametrize("ranks, message", [
    ("4,x", "--ranks '4,x': expected whole numbers"),
    ("0,4", "--ranks '0,4': every rank must be at least 1"),
])
def test_bad_ranks_are_clear_errors(cli, tmp_path, tiny_random, ranks, message):
    res = cli("sweep", make_recipe(tmp_path, tiny_random), "--ranks", ranks)
    assert res.code == 2
    assert message in flat(res.err)
    assert not (tmp_path / "run").exists()
