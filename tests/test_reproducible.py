"""Same seed, same numbers: a run repeated in one process (as compare does) or in a new one gives the same losses,
the same adapter bytes and the same scores; another seed gives other adapter weights."""

import json

from safetensors.torch import load_file

from conftest import recipe_text
from qlora_lite.recipe import TrainRecipe, load_recipe
from qlora_lite.run import run
from qlora_lite.rundir import ADAPTER_WEIGHTS, RunDir
from qlora_lite.train import reproducibility

SETTINGS = ["lora.dropout=0.1",  # dropout draws every step: the Trainer's seeding is exercised too
            "train.max_steps=6", "eval.enabled=true", "eval.max_samples=3", "eval.max_new_tokens=8"]


def run_named(tmp_path, model_dir, data_dir, name, overrides=()):
    path = tmp_path / f"{name}.toml"
    path.write_text(recipe_text(model_dir, data_dir, tmp_path / "runs", name=name))
    return run(load_recipe(path, [*SETTINGS, *overrides])).run_dir


def adapter(run_dir):
    return load_file(run_dir / "adapter" / ADAPTER_WEIGHTS)


def test_a_repeated_run_gives_the_same_losses_adapter_and_scores(tmp_path, tiny_llama, tiny_data):
    first = run_named(tmp_path, tiny_llama, tiny_data, "a")
    second = run_named(tmp_path, tiny_llama, tiny_data, "b")
    assert RunDir(first).losses() == RunDir(second).losses()
    a, b = adapter(first), adapter(second)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    scores = [json.loads((d / "eval.json").read_text()) for d in (first, second)]
    assert scores[0]["tuned"] == scores[1]["tuned"] and scores[0]["base"] == scores[1]["base"]
    result = json.loads((first / "result.json").read_text())
    assert result["seed"] == 42 and result["reproducible"]["bitwise"] is True
    assert "Repeatability: seed 42; a repeat of this run gives the same losses" in (first / "report.md").read_text()


def test_another_seed_gives_other_adapter_weights(tmp_path, tiny_llama, tiny_data):
    first = run_named(tmp_path, tiny_llama, tiny_data, "a")
    other = run_named(tmp_path, tiny_llama, tiny_data, "b", ["train.seed=7"])
    a, b = adapter(first), adapter(other)
    assert all(not a[k].equal(b[k]) for k in a)
    assert RunDir(first).losses()[0] != RunDir(other).losses()[0]


def test_cuda_runs_say_they_are_bit_reproducible_only_with_deterministic_kernels():
    assert reproducibility(TrainRecipe(), "cuda")["bitwise"] is False
    assert "train.deterministic = true" in reproducibility(TrainRecipe(), "cuda")["why"]
    assert reproducibility(TrainRecipe(deterministic=True), "cuda")["bitwise"] is True
