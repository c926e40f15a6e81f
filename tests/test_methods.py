"""The four methods of [method] kind on tiny models: what each trains, that its loss falls, how it is evaluated
and exported, and the comparison files `compare` writes."""

import json

import pytest
import torch

from conftest import recipe_text
from qlora_lite import export
from qlora_lite import model as model_stage
from qlora_lite.cli import main
from qlora_lite.errors import UserError
from qlora_lite.methods import METHODS
from qlora_lite.recipe import RecipeError, load_recipe, parse_methods
from qlora_lite.rundir import RunDir
from qlora_lite.train import train
from test_train import losses, snapshot, train_directly

EVAL = ["eval.enabled=true", "eval.max_samples=4", "eval.max_new_tokens=8", "eval.batch_size=4"]


def make_recipe(tmp_path, model_dir, data_dir, kind, name=None, overrides=(), **extra):
    name = name or kind
    path = tmp_path / f"{name}.toml"
    extra.setdefault("method", f'kind = "{kind}"')
    path.write_text(recipe_text(model_dir, data_dir, tmp_path / "runs", name=name, **extra))
    return load_recipe(path, list(overrides))


def train_method(tmp_path, model_dir, data_dir, kind, overrides=()):
    recipe = make_recipe(tmp_path, model_dir, data_dir, kind, overrides=overrides)
    loaded, ds = train_directly(recipe)
    before = snapshot(loaded.model)
    result = train(loaded, ds, None, recipe.train, RunDir(recipe.run_dir))
    after = snapshot(loaded.model)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    return recipe, loaded, result, moved


def test_full_fine_tuning_updates_every_base_weight_in_fp32(tmp_path, tiny_llama, tiny_data):
    import bitsandbytes as bnb

    recipe, loaded, result, moved = train_method(tmp_path, tiny_llama, tiny_data, "full",
                                                 overrides=["train.learning_rate=1e-3"])
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    params = dict(loaded.model.named_parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params.values())
    assert moved == set(params)  # embeddings, attention, MLP, norms, lm_head: all trained
    assert model_stage.count_parameters(loaded.model) == (sum(p.numel() for p in params.values()),) * 2
    values = losses(recipe.run_dir)
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3 - 0.3, values
    assert result.saved_dir.name == "model" and (result.saved_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_t5"])
def test_prompt_tuning_trains_only_the_virtual_tokens(model_fixture, request, tmp_path, tiny_data):
    recipe, loaded, result, moved = train_method(
        tmp_path, request.getfixturevalue(model_fixture), tiny_data, "prompt_tuning",
        overrides=["train.learning_rate=0.3", "method.num_virtual_tokens=8"],
    )
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert moved == trainable and all("prompt_encoder" in n for n in trainable), moved
    hidden = loaded.model.config.d_model if loaded.is_encoder_decoder else loaded.model.config.hidden_size
    trained, total = model_stage.count_parameters(loaded.model)
    assert trained == sum(loaded.model.get_parameter(n).numel() for n in trainable)
    assert trained % (8 * hidden) == 0 and trained <= 2 * 8 * hidden  # 8 vectors (per transformer stack)
    values = losses(recipe.run_dir)
    assert min(values[-3:]) < values[0] - 0.05, values
    config = json.loads((result.saved_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 8
    assert config["prompt_tuning_init"] == "TEXT" and config["prompt_tuning_init_text"] == "Summarize: Summary:"


def test_lora_method_keeps_the_base_unquantized(tmp_path, tiny_llama, tiny_data):
    import bitsandbytes as bnb

    recipe, loaded, result, moved = train_method(tmp_path, tiny_llama, tiny_data, "lora")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    assert moved and all("lora_" in n for n in moved)
    assert sum(losses(recipe.run_dir)[-3:]) / 3 < sum(losses(recipe.run_dir)[:3]) / 3 - 0.1


def test_method_recipe_errors_name_the_key(tmp_path, tiny_llama, tiny_data):
    with pytest.raises(RecipeError, match='method.kind: expected one of .*got \'qlor\' \\(did you mean qlora'):
        make_recipe(tmp_path, tiny_llama, tiny_data, "qlor")
    with pytest.raises(RecipeError, match='quantization.load_in_4bit = false with method.kind = "qlora"'):
        make_recipe(tmp_path, tiny_llama, tiny_data, "qlora", overrides=["quantization.load_in_4bit=false"])
    with pytest.raises(RecipeError, match="method.prompt_tuning_init_text: only used with"):
        make_recipe(tmp_path, tiny_llama, tiny_data, "lora", overrides=["method.prompt_tuning_init_text=hi"])


def test_full_and_lora_are_evaluated_against_the_same_base(tmp_path, tiny_llama, tiny_data):
    """Full fine-tuning reloads the base for evaluation; LoRA switches its adapter off: same base outputs."""
    from qlora_lite.run import run

    results = {}
    for kind in ("lora", "full"):
        recipe = make_recipe(tmp_path, tiny_llama, tiny_data, kind, export="merge = true",
                             overrides=["train.max_steps=4", *EVAL])
        results[kind] = run(recipe)
    samples = {k: (r.run_dir / "samples.md").read_text() for k, r in results.items()}
    base_lines = {k: [line for line in s.splitlines() if line.startswith("**Base:**")] for k, s in samples.items()}
    assert base_lines["lora"] and base_lines["lora"] == base_lines["full"]
    assert results["full"].merged is None and results["lora"].merged.check.passed  # nothing to merge for full
    with pytest.raises(UserError, match="full fine-tuning trained every weight"):
        export.merge_run(results["full"].run_dir, tmp_path / "out")
    # `eval RUN_DIR` reloads the fully fine-tuned model from run_dir/model and gets the same scores.
    before = json.loads((results["full"].run_dir / "eval.json").read_text())
    assert main(["eval", str(results["full"].run_dir)]) == 0
    after = json.loads((results["full"].run_dir / "eval.json").read_text())
    assert after["tuned"] == pytest.approx(before["tuned"]) and after["base"] == pytest.approx(before["base"])


def test_full_fine_tuning_frees_the_reloaded_base_before_emptying_the_cache(tmp_path, tiny_llama, tiny_data,
                                                                           monkeypatch):
    """Evaluating full fine-tuning reloads the base beside the tuned model; nothing may still hold that copy when
    the allocator cache is emptied, or the tuned model's generation runs beside it."""
    import sys
    import weakref

    monkeypatch.setenv("QLORA_LITE_CACHE", str(tmp_path / "cache"))  # the base is generated, not taken from a cache

    from qlora_lite import evaluate

    recipe = make_recipe(tmp_path, tiny_llama, tiny_data, "full", overrides=EVAL)
    loaded, _ = train_directly(recipe)
    reloaded, alive_at_free = [], []
    load_model, free = model_stage.load_model, evaluate.free_accelerator_memory

    def load_and_watch(*args, **kwargs):
        result = load_model(*args, **kwargs)
        reloaded.append(weakref.ref(result.model))
        return result

    def free_and_record(device):
        if sys._getframe(1).f_code.co_name == "base_model":  # its `finally`, once generation with the base ended
            alive_at_free.append([ref() is not None for ref in reloaded])
        free(device)

    monkeypatch.setattr(model_stage, "load_model", load_and_watch)
    monkeypatch.setattr(evaluate, "free_accelerator_memory", free_and_record)
    evaluate.evaluate_run(loaded, recipe, recipe.run_dir)
    assert len(reloaded) == 1 and alive_at_free == [[False]]


def test_compare_writes_the_table_for_every_method(tmp_path, tiny_llama, tiny_data, capsys):
    path = tmp_path / "cmp.toml"
    path.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", name="cmp"))
    sets = [a for o in [*EVAL, "train.max_steps=4", "train.logging_steps=2"] for a in ("--set", o)]
    assert main(["compare", str(path), "--methods", "qlora,full,prompt_tuning", *sets]) == 0
    out = tmp_path / "runs" / "cmp-compare"
    comparison = json.loads((out / "comparison.json").read_text())
    methods = comparison["methods"]
    assert list(methods) == ["qlora", "full", "prompt_tuning"]
    for kind, row in methods.items():
        recipe = load_recipe(out / kind / "recipe.toml")
        assert recipe.method.kind == kind and recipe.train.seed == 42 and recipe.train.max_steps == 4
        assert row["learning_rate"] == pytest.approx(5e-3 * METHODS[kind].lr_scale)
        assert 0 <= row["rougeL"] <= 1 and row["seconds_per_step"] > 0 and row["peak_gib"] > 0
    assert methods["full"]["trainable_params"] == methods["full"]["total_params"]
    assert methods["prompt_tuning"]["trainable_params"] < methods["qlora"]["trainable_params"]
    assert methods["full"]["stored_bytes"] > 5 * methods["qlora"]["stored_bytes"] > 0
    assert methods["full"]["predicted_peak_gib"] > methods["qlora"]["predicted_peak_gib"]
    md = (out / "comparison.md").read_text()
    assert all(f"| {kind} |" in md for kind in methods) and (out / "comparison.png").stat().st_size > 1000
    assert "methods compared: cmp" in capsys.readouterr().out
    # A second compare refuses to overwrite; --resume keeps the finished runs and only re-renders.
    assert main(["compare", str(path), "--methods", "qlora", *sets]) == 2
    mtime = (out / "qlora" / "eval.json").stat().st_mtime_ns
    assert main(["compare", str(path), "--methods", "qlora", "--resume", *sets]) == 0
    assert (out / "qlora" / "eval.json").stat().st_mtime_ns == mtime
    capsys.readouterr()
    # ... but not a finished run trained on another adapter than the recipe now asks for.
    assert main(["compare", str(path), "--methods", "qlora", "--resume", *sets, "--set", "lora.r=4"]) == 2
    err = capsys.readouterr().err
    assert "the qlora run in" in err and "lora.r: 8 → 4" in err
    # ... nor one kept beside runs of other steps or another evaluation: the table would mix them.
    for change, said in (("train.max_steps=5", "train.max_steps: 4 → 5"), ("eval.max_samples=2", "eval.max_samples")):
        assert main(["compare", str(path), "--methods", "qlora", "--resume", *sets, "--set", change]) == 2
        assert said in capsys.readouterr().err


def test_compare_rejects_unknown_methods():
    with pytest.raises(UserError, match="unknown method qlora2"):
        parse_methods("qlora,qlora2")
    assert parse_methods("all") == list(METHODS)
    with pytest.raises(UserError, match="^--method: unknown method bar"):  # plan's flag is singular
        parse_methods("bar", "--method")


def test_plan_method_shows_each_method_side_by_side(tmp_path, tiny_llama, tiny_data, capsys):
    path = tmp_path / "p.toml"
    path.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", name="p"))
    assert main(["plan", str(path), "--method", "qlora,full", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)["methods"]
    assert plans["full"]["trainable_params"] == plans["full"]["total_params"]
    assert plans["full"]["peak_gib"] > plans["qlora"]["peak_gib"]
    # A budget between the two: QLoRA fits, full fine-tuning does not, and the table says so.
    budget = (plans["full"]["peak_gib"] + plans["qlora"]["peak_gib"]) / 2
    assert main(["plan", str(path), "--method", "all", "--set", f"budget.gpu_memory_gib={budget}"]) == 0
    out = capsys.readouterr().out
    assert "memory plan by method" in out and "prompt_tuning" in out
    fits_row = next(line for line in out.splitlines() if "fits" in line).split("│")
    assert [cell.strip() for cell in fits_row[2:6]] == ["yes", "yes", "no", "yes"]  # qlora, lora, full, prompt
    assert main(["plan", str(path), "--method", "full", "--set", f"budget.gpu_memory_gib={budget}"]) == 3
