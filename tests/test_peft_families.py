"""The PEFT families beyond LoRA (ln_tuning: selective; ia3: additive) and LoRA's variants (rsLoRA, DoRA, the
initialisations, LoRA+) on tiny 4-bit models: what trains, that the loss falls, what merges or is refused, what
the planner counts, and one clear error for each bad combination."""

import math

import pytest
import torch

from qlora_lite import export
from qlora_lite.errors import UserError
from qlora_lite.memory import analyze, layer_bytes, load_model_config, plan_memory, precision
from qlora_lite.methods import METHODS
from qlora_lite.model import count_parameters
from qlora_lite.report import recipe_summary
from qlora_lite.recipe import LORA_INITS, LoraRecipe, MethodRecipe, RecipeError, recipe_to_toml
from qlora_lite.rundir import RunDir
from qlora_lite.train import build_trainer, train
from test_memory import load_method, padded_batch, saved_bytes
from test_memory import make_recipe as plan_recipe
from test_methods import make_recipe, train_method
from test_train import losses, train_directly


def is_4bit(model) -> bool:
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def trained_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def falls(values: list[float], by: float) -> bool:
    return sum(values[-3:]) / 3 < sum(values[:3]) / 3 - by


# ---------------------------------------------------------------- ln_tuning and ia3


@pytest.mark.parametrize("kind", ["ln_tuning", "ia3"])
def test_ln_tuning_and_ia3_train_only_their_weights_on_a_4bit_base_and_merge(kind, tmp_path, tiny_llama, tiny_data):
    recipe, loaded, result, moved = train_method(tmp_path, tiny_llama, tiny_data, kind,
                                                 overrides=["train.learning_rate=0.1"])
    model = loaded.model
    assert is_4bit(model) and recipe.load_in_4bit
    trainable = trained_names(model)
    assert moved == trainable
    layers = {n.removeprefix("base_model.model.").split(".ln_tuning_layers.")[0].removesuffix(".ia3_l.default")
              for n in trainable}
    if kind == "ln_tuning":  # a trainable copy of each norm: two per block and the final one
        assert all(n.endswith(".ln_tuning_layers.default.weight") for n in trainable), trainable
        assert layers == {f"model.layers.{i}.{norm}" for i in (0, 1)
                          for norm in ("input_layernorm", "post_attention_layernorm")} | {"model.norm"}
    else:  # one vector on each key, value and down projection
        assert all(n.endswith(".ia3_l.default") for n in trainable), trainable
        assert layers == {f"model.layers.{i}.{layer}" for i in (0, 1)
                          for layer in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert falls(losses(recipe.run_dir), 0.05), losses(recipe.run_dir)
    assert METHODS[kind].not_merged is None  # both merge: PEFT swaps in the trained norms, or scales the weights
    (recipe.run_dir / "recipe.toml").write_text(recipe_to_toml(recipe))
    merged = export.merge_run(recipe.run_dir, tmp_path / "merged", dtype="fp32")
    assert merged.check.passed and merged.check.relative_diff < 1e-3, merged.check


def test_ia3_on_t5_uses_peft_targets_and_an_unknown_family_falls_back_to_every_linear(tmp_path, tiny_t5, tiny_gpt2):
    """T5: PEFT's table (k, v and the MLP's wo); an architecture outside it: every linear layer's output, and the
    input of those reading the MLP's width."""
    from qlora_lite.model import attach_ia3, load_model

    recipe = plan_recipe(tiny_t5, method=MethodRecipe(kind="ia3"))
    model = load_method(recipe)
    assert {n.rsplit(".", 3)[-3] for n in trained_names(model)} == {"k", "v", "wo"}
    loaded = load_model(recipe.model, recipe.quantization, recipe.train, recipe.method)
    loaded.model.config.model_type = "unknown_family"
    model = attach_ia3(loaded, recipe.train)
    vectors = {n.removeprefix("base_model.model.").removesuffix(".ia3_l.default"): model.get_parameter(n)
               for n in trained_names(model)}
    assert {name.rsplit(".", 1)[-1] for name in vectors} == {"q", "k", "v", "o", "wi", "wo"}
    assert all(v.shape == ((1, 128) if name.endswith(".wo") else (v.numel(), 1)) for name, v in vectors.items())


@pytest.mark.parametrize("kind", ["ln_tuning", "ia3"])
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_planner_counts_what_ln_tuning_and_ia3_train(kind, family, tiny_llama, tiny_t5):
    recipe = plan_recipe(tiny_t5 if family == "t5" else tiny_llama, method=MethodRecipe(kind=kind))
    model = load_method(recipe)
    arch = analyze(recipe, load_model_config(recipe.model))
    assert (arch.params.trainable, arch.params.total) == count_parameters(model)
    assert arch.params.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert plan_memory(recipe, load_model_config(recipe.model)).trainable_params == arch.params.trainable


@pytest.mark.parametrize("variant", ["ln_tuning", "ia3", "dora"])
def test_a_block_saves_what_the_plan_says(variant, tiny_llama):
    """Trained norms keep their normalized input, IA3 the tensors its vectors scale, DoRA its base outputs."""
    kind = "qlora" if variant == "dora" else variant
    recipe = plan_recipe(tiny_llama, method=MethodRecipe(kind=kind),
                         lora=LoraRecipe(r=8, dropout=0.0, use_dora=variant == "dora"))
    model = load_method(recipe)
    b, s = recipe.train.micro_batch_size, recipe.train.max_length
    ids, mask = padded_batch(model.config.vocab_size, b, s)
    block = model.get_base_model().model.layers[1]
    saved = saved_bytes(model, {"block1": block}, lambda: model(input_ids=ids, attention_mask=mask, labels=ids))
    arch = analyze(recipe, load_model_config(recipe.model))
    # PEFT's 4-bit IA3 layer multiplies 1 by its vector, a copy per layer whatever the batch: bytes, not planned
    vector_copies = 4 * sum(width for _, width in arch.ia3_scaled) if variant == "ia3" else 0
    planned = b * s * layer_bytes(arch, precision(recipe, arch, "cpu"), recipe, "cpu", s)
    if variant == "dora":  # PEFT's DoRA rebuilds each weight from per-layer temporaries; measured 11% above
        assert planned == pytest.approx(saved["block1"], rel=0.15)
    else:
        assert saved["block1"] == planned + vector_copies


def test_dora_adds_its_magnitudes_and_its_rebuilt_weight_to_the_plan(tiny_llama):
    config = load_model_config(plan_recipe(tiny_llama).model)
    plans = {dora: plan_memory(plan_recipe(tiny_llama, lora=LoraRecipe(r=8, use_dora=dora)), config, device="cuda")
             for dora in (False, True)}
    model = load_method(plan_recipe(tiny_llama, lora=LoraRecipe(r=8, use_dora=True)))
    magnitudes = sum(p.numel() for n, p in model.named_parameters() if "lora_magnitude_vector" in n)
    assert magnitudes == 2 * (3 * 64 + 2 * 32 + 2 * 128)  # q, o, down: 64; k, v: 32; gate, up: 128; two blocks
    assert plans[True].trainable_params == plans[False].trainable_params + magnitudes
    assert plans[True].train_peak_gib > plans[False].train_peak_gib
    assert plans[True].components["optimizer"] > plans[False].components["optimizer"]


# ---------------------------------------------------------------- LoRA variants


def test_dora_and_rslora_train(tmp_path, tiny_llama, tiny_data):
    recipe, loaded, _, moved = train_method(tmp_path, tiny_llama, tiny_data, "qlora",
                                            overrides=["lora.use_dora=true", "lora.use_rslora=true"])
    trainable = trained_names(loaded.model)
    assert is_4bit(loaded.model) and moved == trainable
    assert {n.rsplit(".", 3)[-3] for n in trainable} == {"lora_A", "lora_B", "lora_magnitude_vector"}
    layer = loaded.model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(recipe.lora.alpha / math.sqrt(recipe.lora.r))  # not alpha / r
    assert falls(losses(recipe.run_dir), 0.1)
    assert dict(recipe_summary(recipe))["LoRA"].endswith("targets all-linear, rsLoRA, DoRA")  # the report says so


@pytest.mark.parametrize("init", LORA_INITS)
def test_each_init_trains_or_is_refused_with_its_reason(init, tmp_path, tiny_llama, tiny_data):
    reasons = {"olora": "rewrites the base weights", "pissa": "rewrites the base weights",
               "corda": "rewrites the base weights", "eva": "an SVD of each layer's inputs over the training data"}
    overrides = [f'lora.init="{init}"']
    if init in reasons:
        with pytest.raises(RecipeError, match=f'lora.init = "{init}": .*{reasons[init]}.*use init = "default"'):
            make_recipe(tmp_path, tiny_llama, tiny_data, "qlora", overrides=overrides)
        return
    recipe, loaded, _, moved = train_method(tmp_path, tiny_llama, tiny_data, "qlora", overrides=overrides)
    assert moved == trained_names(loaded.model) and falls(losses(recipe.run_dir), 0.1)


def test_gaussian_starts_at_the_base_and_loftq_closer_to_the_unquantized_model(tmp_path, tiny_llama, tiny_data):
    """gaussian draws A from a normal distribution, B = 0 as by default; LoftQ sets B @ A * scaling to the rank-r
    SVD of each weight's NF4 rounding error, so the 4-bit model + adapter starts nearer the 16-bit one."""
    from transformers import AutoModelForCausalLM

    ids, _ = padded_batch(400, 2, 16)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    full = original(input_ids=ids).logits
    errors, models = {}, {}
    for init in ("default", "gaussian", "loftq"):
        recipe = make_recipe(tmp_path, tiny_llama, tiny_data, "qlora", name=init, overrides=[f'lora.init="{init}"'])
        models[init], _ = train_directly(recipe)
        with torch.no_grad():
            errors[init] = (models[init].model(input_ids=ids).logits - full).abs().mean().item()
    assert errors["gaussian"] == errors["default"] and errors["loftq"] < errors["default"], errors
    layer = models["loftq"].model.get_base_model().model.layers[0].self_attn.q_proj
    weight = original.model.layers[0].self_attn.q_proj.weight.detach()
    rounded = export.nf4_round_trip(weight, recipe.quantization, torch.float32)
    update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    tail = torch.linalg.svdvals(weight - rounded)[recipe.lora.r:].norm()  # what rank r cannot capture
    assert (weight - rounded - update).norm().item() == pytest.approx(tail.item(), rel=1e-3)
    assert tail < 0.9 * (weight - rounded).norm()
    # ... so its adapter belongs on the NF4-rounded base only: merging into the original weights is refused.
    with pytest.raises(RecipeError, match='export.base = "original": the adapter starts at the NF4 rounding error'):
        make_recipe(tmp_path, tiny_llama, tiny_data, "qlora", name="x", overrides=['lora.init="loftq"'],
                    export='base = "original"')
    with pytest.raises(RecipeError, match='lora.init = "loftq": fits the adapter to the 4-bit rounding error'):
        make_recipe(tmp_path, tiny_llama, tiny_data, "lora", name="y", overrides=['lora.init="loftq"'])


def test_loftq_run_refuses_a_merge_into_the_original_weights(tmp_path, tiny_llama, tiny_data):
    recipe, *_ = train_method(tmp_path, tiny_llama, tiny_data, "qlora",
                              overrides=['lora.init="loftq"', "train.max_steps=2"])
    (recipe.run_dir / "recipe.toml").write_text(recipe_to_toml(recipe))
    with pytest.raises(UserError, match="would add that correction twice.*--base dequantized"):
        export.merge_run(recipe.run_dir, tmp_path / "out", base="original")
    assert export.merge_run(recipe.run_dir, tmp_path / "out2", dtype="fp32").check.passed


def test_loraplus_trains_lora_b_at_ratio_times_the_rate(tmp_path, tiny_llama, tiny_data):
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data, "qlora", overrides=["train.loraplus_lr_ratio=16"])
    loaded, ds = train_directly(recipe)
    trainer = build_trainer(loaded, ds, None, recipe.train, RunDir(recipe.run_dir), [])
    names = {id(p): n for n, p in loaded.model.named_parameters()}
    rates = {names[id(p)].rsplit(".", 3)[-3]: g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert rates == {"lora_A": pytest.approx(5e-3), "lora_B": pytest.approx(16 * 5e-3)}
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(trained_names(loaded.model))
    train(loaded, ds, None, recipe.train, RunDir(recipe.run_dir))
    assert falls(losses(recipe.run_dir), 0.1)


# ---------------------------------------------------------------- bad combinations


@pytest.mark.parametrize("kind", ["prompt_tuning", "ia3", "ln_tuning", "full"])
@pytest.mark.parametrize("setting", ["lora.use_dora=true", "lora.use_rslora=true", 'lora.init="gaussian"',
                                     "train.loraplus_lr_ratio=16"])
def test_lora_settings_with_a_method_without_lora_are_one_clear_error(kind, setting, tmp_path, tiny_llama,
                                                                     tiny_data):
    key = setting.split("=")[0]
    with pytest.raises(RecipeError, match="1 problem") as error:
        make_recipe(tmp_path, tiny_llama, tiny_data, kind, overrides=[setting])
    assert f'{key} = ' in str(error.value) and f'method.kind = "{kind}" trains no LoRA' in str(error.value)
    assert '[method] kind to "qlora", "lora"' in str(error.value)


def test_bad_variant_values_name_the_key(tmp_path, tiny_llama, tiny_data):
    with pytest.raises(RecipeError, match=r"lora.init: expected one of .*got 'pisa' \(did you mean pissa"):
        make_recipe(tmp_path, tiny_llama, tiny_data, "qlora", overrides=['lora.init="pisa"'])
    with pytest.raises(RecipeError, match=r"train.loraplus_lr_ratio: expected a value in \[1, "):
        make_recipe(tmp_path, tiny_llama, tiny_data, "qlora", overrides=["train.loraplus_lr_ratio=0.5"])
    with pytest.raises(RecipeError, match="lora.use_dora: expected true/false"):
        make_recipe(tmp_path, tiny_llama, tiny_data, "qlora", overrides=['lora.use_dora="yes"'])
    with pytest.raises(RecipeError, match='"loftq" with lora.use_dora = true: not supported together'):
        make_recipe(tmp_path, tiny_llama, tiny_data, "qlora", overrides=['lora.init="loftq"', "lora.use_dora=true"])


def test_every_method_has_a_family_and_compare_groups_by_it():
    from qlora_lite.compare import FAMILY_ORDER, table_rows

    assert {m.family for m in METHODS.values()} == set(FAMILY_ORDER)
    assert METHODS["ln_tuning"].family == "selective" and METHODS["ia3"].family == "additive"
    row = dict(learning_rate=1e-3, trainable_params=10, total_params=100, trainable_pct=10.0, peak_gib=1.0,
               predicted_peak_gib=1.0, measured_peak_gib=None, cpu_rss_peak_gib=1.0, seconds_per_step=1.0,
               tokens_per_s=10.0, stored_bytes=1000, rouge1=0.1, rouge2=0.1, rougeL=0.1, rougeLsum=0.1,
               rougeL_gain=0.0, forgetting_perplexity_change_pct=None)
    header, rows = table_rows({k: row for k in ("ia3", "qlora", "ln_tuning", "prompt_tuning", "full")})
    assert header[:2] == ["method", "family"]
    assert [r[:2] for r in rows] == [["ln_tuning", "selective"], ["full", "selective"],
                                     ["qlora", "reparameterization"], ["ia3", "additive"],
                                     ["prompt_tuning", "additive"]]
