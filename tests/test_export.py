"""Export: the NF4 round trip reproduces the 4-bit model's weights, merged models load with plain transformers
and match the model they stand for (the real 4-bit model + adapter, or the unmerged base + adapter), and an
existing folder is never overwritten without --force."""

import json

import pytest
import torch

from qlora_lite import events, export
from qlora_lite import model as model_stage
from qlora_lite.errors import UserError
from test_evaluate import make_run


def auto_class(seq2seq: bool):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM


def four_bit_with_adapter(recipe, run_dir, *, exact_path: bool):
    """The run's 4-bit model + adapter as training builds it; `exact_path` keeps bitsandbytes' CPU layers on
    their training path (fp32), else they run their inference path (repacked, bf16 precision)."""
    import bitsandbytes as bnb

    loaded = model_stage.load_model(recipe.model, recipe.quantization, recipe.train)
    model = export.load_adapter(loaded.model, run_dir)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and exact_path:
            module.train()
    return model, loaded


def test_nf4_round_trip_equals_the_loaded_4bit_weights(tiny_llama):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    from qlora_lite.recipe import ModelRecipe, QuantizationRecipe, TrainRecipe

    quant = QuantizationRecipe()
    loaded = model_stage.load_model(ModelRecipe(name=str(tiny_llama)), quant, TrainRecipe(device="cpu"))
    full = dict(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).named_modules())
    layers = [(n, m) for n, m in loaded.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14  # every Linear but lm_head
    for name, layer in layers:
        # Freshly loaded, not yet repacked for CPU inference: dequantize_4bit reads this layout correctly.
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        held = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(export.nf4_round_trip(full[name].weight, quant, torch.float32), held), name


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_t5", "tiny_gpt2"])
def test_merged_models_load_with_transformers_and_match_their_reference(model_fixture, request, tmp_path, tiny_data):
    seq2seq = model_fixture == "tiny_t5"
    recipe, _ = make_run(tmp_path, request.getfixturevalue(model_fixture), tiny_data)
    exports = {b: export.merge_run(recipe.run_dir, tmp_path / b, dtype="fp32", base=b)
               for b in ("dequantized", "original")}
    for base, result in exports.items():
        assert result.check.passed and result.check.relative_diff < 1e-3, result.check
        assert json.loads((result.out_dir / "merge_check.json").read_text())["passed"] is True
        quantized = {"tiny_llama": 14, "tiny_t5": 28, "tiny_gpt2": 8}[model_fixture]  # GPT-2: Conv1D layers
        assert result.rounded_weights == (0 if base == "original" else quantized)
    merged = {b: auto_class(seq2seq).from_pretrained(r.out_dir).eval() for b, r in exports.items()}
    assert not any("lora" in n for n, _ in merged["original"].named_parameters())
    assert merged["original"].dtype == torch.float32

    # Independent references, built here: the unmerged fp32 base + adapter, and the real 4-bit model + adapter.
    tokenizer = model_stage.load_tokenizer(str(exports["original"].out_dir))
    inputs = export.check_inputs(tokenizer, merged["original"].config)
    unmerged = export.load_adapter(auto_class(seq2seq).from_pretrained(recipe.model.name, dtype=torch.float32),
                                   recipe.run_dir).eval()
    four_bit, _ = four_bit_with_adapter(recipe, recipe.run_dir, exact_path=True)

    def relative(model, reference):
        return export.compare(export.logits(model, inputs), export.Reference("", reference, torch.float32, []), 0)

    original_ref, four_bit_ref = export.logits(unmerged, inputs), export.logits(four_bit, inputs)
    assert relative(merged["original"], original_ref).relative_diff < 1e-3
    assert relative(merged["dequantized"], four_bit_ref).relative_diff < 1e-3
    # The check can tell the two apart: the original-base merge is not the model that was trained.
    assert relative(merged["original"], four_bit_ref).relative_diff > 1e-2
    # bitsandbytes' CPU inference path (bf16 precision) stays within about 1% of the logit scale.
    four_bit.eval()
    assert relative(merged["dequantized"], export.logits(four_bit, inputs)).relative_diff < 2e-2


def test_bf16_export_is_stored_in_bf16_with_a_card(tmp_path, tiny_llama, tiny_data):
    recipe, _ = make_run(tmp_path, tiny_llama, tiny_data, steps=3)
    (recipe.run_dir / "eval.json").write_text(json.dumps({
        "base": dict(rouge1=0.1, rouge2=0.0, rougeL=0.1, rougeLsum=0.1),
        "tuned": dict(rouge1=0.4, rouge2=0.2, rougeL=0.3, rougeLsum=0.35), "n": 6, "split": "test",
    }))
    result = export.merge_run(recipe.run_dir, tmp_path / "out", dtype="bf16")
    assert result.check.passed and result.base == "dequantized"
    reloaded = auto_class(False).from_pretrained(result.out_dir)
    assert reloaded.dtype == torch.bfloat16
    names = {p.name for p in result.out_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md",
            "merge_check.json"} <= names
    card = (result.out_dir / "README.md").read_text()
    assert f"base_model: {recipe.model.name}" in card and "license: unknown" in card
    assert "| tuned | 40.00 | 20.00 | 30.00 | 35.00 |" in card
    assert "r 8, alpha 16" in card and "passed" in card


def test_a_run_without_4bit_merges_into_the_original_base(tmp_path, tiny_llama, tiny_data):
    recipe, _ = make_run(tmp_path, tiny_llama, tiny_data, steps=2, overrides=["method.kind=lora"])
    result = export.merge_run(recipe.run_dir, tmp_path / "out", dtype="fp32", base="dequantized")
    assert result.base == "original" and result.rounded_weights == 0 and result.check.passed


def test_run_announces_the_base_its_merge_uses(tmp_path, tiny_llama, tiny_data):
    """A lora run said "merging into the dequantized base", then merged into the original one."""
    from test_train import make_recipe

    from qlora_lite.run import run

    recipe = make_recipe(tmp_path, tiny_llama, tiny_data, overrides=[
        "method.kind=lora", "train.max_steps=1", "export.merge=true", "export.dtype=fp32"])
    seen = []
    result = run(recipe, notify=seen.append)
    (merging,) = [e for e in seen if isinstance(e, events.Merging)]
    assert merging.base == result.merged.base == "original"


def test_refuses_a_non_empty_folder_unless_forced_and_keeps_other_files(tmp_path, tiny_llama, tiny_data):
    recipe, _ = make_run(tmp_path, tiny_llama, tiny_data, steps=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty.*--force"):
        export.merge_run(recipe.run_dir, out, dtype="fp32")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    export.merge_run(recipe.run_dir, out, dtype="fp32", force=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").is_file()
    with pytest.raises(UserError, match="not a run directory"):
        export.merge_run(tmp_path / "nowhere", tmp_path / "out2")


def test_check_inputs_give_t5_a_decoder_start(tiny_t5):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_t5)
    inputs = export.check_inputs(model_stage.load_tokenizer(str(tiny_t5)), config)
    assert all(x["decoder_input_ids"][0, 0].item() == config.decoder_start_token_id for x in inputs)
