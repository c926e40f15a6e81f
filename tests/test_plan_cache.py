"""The planner's skeleton cache: a repeated plan reuses the Arch (no torch, transformers or peft imported), any
change that could alter it misses, and a broken or unwritable cache never fails a plan."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import recipe_text
from qlora_lite import memory, source
from qlora_lite.memory import analyze, load_model_config, plan_from_arch, plan_memory, recipe_arch
from qlora_lite.memory_arch import Arch
from qlora_lite.recipe import LoraRecipe, MethodRecipe, ModelRecipe, Recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QLORA_LITE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "plan"


@pytest.fixture
def analyzed(monkeypatch) -> list:
    """The recipes memory.analyze was called with."""
    calls = []

    def counting(recipe, config):
        calls.append(recipe)
        return analyze(recipe, config)

    monkeypatch.setattr(memory, "analyze", counting)
    return calls


def model_folder(tiny_llama, tmp_path, **changes) -> Path:
    """A copy of the tiny Llama's config.json (all a plan reads), with `changes` written into it."""
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    config = json.loads((tiny_llama / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def llama_recipe(folder, r=8, kind="qlora") -> Recipe:
    return Recipe(name="t", model=ModelRecipe(name=str(folder)), lora=LoraRecipe(r=r), method=MethodRecipe(kind=kind))


def test_second_plan_reuses_the_arch(tiny_llama, tmp_path, cache, monkeypatch):
    recipe = llama_recipe(model_folder(tiny_llama, tmp_path))
    config = load_model_config(recipe.model)
    first, plan = recipe_arch(recipe), plan_memory(recipe, config)
    assert first == analyze(recipe, config) and len(list(cache.glob("*.json"))) == 1
    monkeypatch.setattr(memory, "analyze", lambda *a: pytest.fail("analyze ran on a cache hit"))
    monkeypatch.setattr(memory, "load_model_config", lambda *a: pytest.fail("the config was read on a cache hit"))
    second = recipe_arch(recipe)
    assert second == first and plan_from_arch(recipe, second) == plan


def test_t5_arch_round_trips_through_json_exactly(tiny_t5):
    recipe = Recipe(name="t", model=ModelRecipe(name=str(tiny_t5)))
    arch = analyze(recipe, load_model_config(recipe.model))
    assert arch.dropout == 0.1 and arch.block_norms and arch.linear_inputs  # floats and nested tuples
    assert Arch.from_json(json.loads(json.dumps(arch.to_json()))) == arch


def test_what_changes_the_arch_misses(tiny_llama, tmp_path, cache, analyzed):
    folder = model_folder(tiny_llama, tmp_path)
    base = recipe_arch(llama_recipe(folder))
    wider = recipe_arch(llama_recipe(folder, r=16))
    assert wider.params.trainable == 2 * base.params.trainable
    full = recipe_arch(llama_recipe(folder, kind="full"))
    assert full.params.trainable == full.params.base == base.params.base
    deeper = llama_recipe(model_folder(tiny_llama, tmp_path, num_hidden_layers=3))
    assert recipe_arch(deeper).layers == 3
    assert len(analyzed) == 4 and len(list(cache.glob("*.json"))) == 4
    assert recipe_arch(deeper) == analyze(deeper, load_model_config(deeper.model)) and len(analyzed) == 4


def test_a_corrupt_cache_file_is_rewritten(tiny_llama, tmp_path, cache, analyzed):
    recipe = llama_recipe(model_folder(tiny_llama, tmp_path))
    arch = recipe_arch(recipe)
    [path] = cache.glob("*.json")
    path.write_text('{"method": "qlora", "hid')
    assert recipe_arch(recipe) == arch and len(analyzed) == 2
    assert Arch.from_json(json.loads(path.read_text())) == arch


def test_an_unwritable_cache_still_plans(tiny_llama, tmp_path, monkeypatch, analyzed):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("QLORA_LITE_CACHE", str(tmp_path / "file" / "cache"))  # mkdir fails, as root too
    recipe = llama_recipe(model_folder(tiny_llama, tmp_path))
    assert recipe_arch(recipe) == recipe_arch(recipe) and len(analyzed) == 2


def test_key_of_hub_models_and_remote_code(tiny_llama, tmp_path, monkeypatch):
    """A hub id is keyed by the config.json the hub cache holds; not cached, or remote code: no key, no cache."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    shutil.copy(tiny_llama / "config.json", snapshot)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config_sha = hashlib.sha256((tiny_llama / "config.json").read_bytes()).hexdigest()
    assert source.config_identity(ModelRecipe(name="org/tiny")) == config_sha
    assert source.config_identity(ModelRecipe(name="org/elsewhere")) is None
    assert memory.arch_key(llama_recipe("org/tiny")) is not None
    assert memory.arch_key(Recipe(name="t", model=ModelRecipe(name="org/tiny", trust_remote_code=True))) is None


def test_a_cached_cli_plan_is_the_same_and_imports_no_torch_transformers_or_peft(tiny_llama, tiny_data, tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs"))
    env = {**os.environ, "QLORA_LITE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    plan = [sys.executable, "-m", "qlora_lite", "plan", str(path), "--json"]
    cold = subprocess.run(plan, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    warm = subprocess.run([plan[0], "-X", "importtime", *plan[1:]], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert cold.returncode == warm.returncode == 0, cold.stderr + warm.stderr[-2000:]
    assert json.loads(warm.stdout) == json.loads(cold.stdout)
    imported = [line.rsplit("|", 1)[-1].strip() for line in warm.stderr.splitlines() if "|" in line]
    assert "qlora_lite.memory" in imported and not {"torch", "transformers", "peft"} & set(imported)
