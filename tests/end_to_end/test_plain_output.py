"""What the README promises of piped output ("plain text without colour or box drawing"), for
the commands whose output was still drawn with box characters or told apart by colour alone."""

from __future__ import annotations

from conftest import make_recipe, write_jsonl

BOX_DRAWING = set(chr(c) for c in range(0x2500, 0x2580))


def _plain(text: str) -> bool:
    return "\x1b[" not in text and not (BOX_DRAWING & set(text))


def test_preference_preview_names_each_part_in_plain_text(tiny_random, tmp_path, cli):
    pairs = [{"prompt": "Say yes.", "chosen": "yes!", "rejected": "no"}]
    recipe = make_recipe(tmp_path, tiny_random, write_jsonl(tmp_path / "pairs.jsonl", pairs),
                         train={"objective": "dpo"})
    res = cli("data", "preview", recipe)
    assert res.code == 0, res
    assert _plain(res.out), res.out
    assert "\n-- row 1\n  prompt (masked): " in res.out
    prompt, answers = res.out.split("\n  prompt (masked): ", 1)[1].split("\n  chosen (supervised): ", 1)
    assert "Say yes." in prompt  # named as the prompt, not only dimmed
    assert answers.startswith("yes!") and "\n  rejected (supervised): no" in answers


def test_piped_preview_names_no_colour_it_does_not_show(tiny_random, tmp_path, cli):
    """Piped, the supervised text is marked by [[ ]] alone: the legend does not send the reader
    looking for green."""
    res = cli("data", "preview", make_recipe(tmp_path, tiny_random), "--rows", "1")
    assert res.code == 0 and _plain(res.out), res
    assert "(supervised text between [[ and ]]; the rest is masked)" in res.out and "green" not in res.out


def test_sweep_output_is_plain_when_piped(tiny_random, tmp_path, cli):
    res = cli("sweep", make_recipe(tmp_path, tiny_random), "--ranks", "2,4")
    assert res.code == 0, res
    assert _plain(res.out), res.out
    assert any(line.startswith("-") and "rank 2, alpha" in line for line in res.out.splitlines()), res.out
