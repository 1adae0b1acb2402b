"""An adapter, checkpoint or model folder is data: nothing read from one may run code.

Each case builds a folder that asks for code (an `auto_map` naming a module shipped beside it,
and a saved recipe that says model.trust_remote_code: true). The module, if it ever ran,
would leave a marker file; the commands must refuse with exit 2, say what the folder asked
for, and leave no marker. Only the user's own --trust-remote-code lets it run."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import make_recipe
from inference_helpers import random_adapter
from lora_cli.train.checkpoint import newest_complete
from safety_helpers import assert_clean_refusal

PAYLOAD = '''
from pathlib import Path
Path({marker!r}).write_text("the folder's code ran")
from transformers import PreTrainedTokenizerFast


class ShippedTokenizer(PreTrainedTokenizerFast):
    pass
'''


def _ask_for_code(folder: Path, marker: Path) -> None:
    """Make `folder`'s tokenizer one only its shipped module can build, and save the recipe
    an attacker would: trust_remote_code switched on."""
    (folder / "shipped_tokenizer.py").write_text(PAYLOAD.format(marker=str(marker)), encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "ShippedTokenizer"
    config["auto_map"] = {"AutoTokenizer": [None, "shipped_tokenizer.ShippedTokenizer"]}
    config_file.write_text(json.dumps(config), encoding="utf-8")


@pytest.fixture
def hostile_adapter(tmp_path, tiny_random) -> tuple[Path, Path]:
    """(adapter folder with a tokenizer that asks for code and a recipe that allows it, marker)."""
    from transformers import AutoTokenizer

    adapter = random_adapter(tiny_random, tmp_path / "downloaded", seed=1)
    AutoTokenizer.from_pretrained(tiny_random).save_pretrained(adapter)
    recipe = {"model": {"name_or_path": str(tiny_random), "trust_remote_code": True}}
    (adapter / "lora_recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    marker = tmp_path / "code-ran"
    _ask_for_code(adapter, marker)
    return adapter, marker


@pytest.mark.parametrize("command", [
    ["generate", "hello", "--adapter", "{adapter}", "--max-new-tokens", "2"],
    ["merge", "--adapter", "{adapter}", "--out", "{tmp}/merged"],
    ["export", "--adapter", "{adapter}", "--format", "gguf", "--out", "{tmp}/model.gguf"],
], ids=["generate", "merge", "export"])
def test_adapter_folder_cannot_switch_remote_code_on(command, hostile_adapter, cli, tmp_path):
    adapter, marker = hostile_adapter
    argv = [w.format(adapter=adapter, tmp=tmp_path) for w in command]
    result = cli(*argv)
    assert_clean_refusal(result, "asks to run Python code shipped with it")
    assert "shipped_tokenizer.ShippedTokenizer" in result.err  # what it asked for is named
    assert not marker.exists(), "code shipped in the adapter folder ran"
    assert not (tmp_path / "merged").exists() and not (tmp_path / "model.gguf").exists()


def test_only_the_user_can_allow_remote_code(hostile_adapter, cli):
    """The flag is the user's: with it the shipped tokenizer loads (and its code runs)."""
    adapter, marker = hostile_adapter
    result = cli("generate", "hello", "--adapter", adapter, "--max-new-tokens", "2", "--trust-remote-code")
    assert result.code == 0, result
    assert marker.exists()


def test_base_model_asking_for_code_is_refused(tmp_path, tiny_random, cli):
    """The base an adapter names can ask too: its config.json's auto_map is named."""
    base = tmp_path / "base"
    shutil.copytree(tiny_random, base)
    marker = tmp_path / "code-ran"
    (base / "shipped_model.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n",
                                           encoding="utf-8")
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    config.update(model_type="shipped-arch", auto_map={"AutoConfig": "shipped_model.Config",
                                                       "AutoModelForCausalLM": "shipped_model.Model"})
    (base / "config.json").write_text(json.dumps(config), encoding="utf-8")
    adapter = random_adapter(tiny_random, tmp_path / "adapter", seed=2)
    result = cli("generate", "hello", "--adapter", adapter, "--base", base, "--max-new-tokens", "2")
    assert_clean_refusal(result, "shipped_model.Model")
    assert not marker.exists()


# --------------------------------------------------------------------------- checkpoints

TRAIN = {"max_steps": 2, "save_steps": 1, "logging_steps": 1}
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture
def interrupted_run(tmp_path, tiny_random, cli, monkeypatch) -> tuple[Path, Path]:
    """(recipe, the checkpoint --resume takes) of a run with complete checkpoints but no final
    adapter, as a kill leaves it."""
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "data-cache"))
    recipe = make_recipe(tmp_path, tiny_random, train=TRAIN, lora=LORA)
    assert cli("train", recipe).code == 0
    run = tmp_path / "run"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / name).unlink()  # what says the run finished
    return recipe, newest_complete(run)


class _Payload:
    def __reduce__(self):
        return (print, ("a pickle ran",))


def test_checkpoint_pickle_that_is_not_tensors_is_refused(interrupted_run, cli):
    recipe, checkpoint = interrupted_run
    optimizer = checkpoint / "optimizer.pt"
    import torch

    torch.save({"state": {}, "param_groups": [], "extra": _Payload()}, optimizer)
    result = cli("train", recipe, "--resume")
    assert_clean_refusal(result, str(optimizer))
    assert "a pickle ran" not in result.out + result.err
    assert "builtins.print" in result.err  # what the pickle wanted to call


def test_checkpoint_without_its_optimizer_does_not_resume_with_a_fresh_one(interrupted_run, cli):
    recipe, checkpoint = interrupted_run
    (checkpoint / "optimizer.pt").unlink()
    result = cli("train", recipe, "--resume")
    assert_clean_refusal(result, "lacks optimizer.pt")


def test_checkpoint_file_that_is_not_torch_is_refused(interrupted_run, cli):
    recipe, checkpoint = interrupted_run
    rng = checkpoint / "rng_state.pth"
    rng.write_bytes(pickle.dumps({"not": "a torch archive"}))
    assert_clean_refusal(cli("train", recipe, "--resume"), str(rng))


def test_untouched_checkpoint_still_resumes(interrupted_run, cli):
    recipe, checkpoint = interrupted_run
    result = cli("train", recipe, "--resume")
    assert result.code == 0, result
    assert (checkpoint.parent / "adapter_config.json").is_file()
