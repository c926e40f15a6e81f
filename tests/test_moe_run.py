"""A mixture-of-experts model (Mixtral, Qwen3-MoE, OLMoE) through the whole run (issue 17): its fused experts load
in 4-bit, LoRA trains on them and on attention, the plan counts them in 4-bit, the merge reproduces the trained
model, and --resume goes on."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import corpus, recipe_text, train_tokenizer
from qlora_lite.cli import main


FAMILIES = {  # tiny sizes; each family names its experts and their width its own way
    "mixtral": dict(num_local_experts=4, intermediate_size=128),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=128, intermediate_size=128, head_dim=16),
    "olmoe": dict(num_experts=4, intermediate_size=128),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny_moe(request, tmp_path_factory):
    """A 2-layer mixture of experts of each family (4 experts, 2 per token) with a trained tokenizer, saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = train_tokenizer(corpus(), bos=True, specials=["<unk>", "<s>", "</s>"])
    config = AutoConfig.for_model(
        request.param, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=512,
        **FAMILIES[request.param])
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_moe_model_trains_qlora_on_4bit_experts_merges_and_resumes(tiny_moe, tiny_data, tmp_path, capsys):
    from qlora_lite import memory
    from qlora_lite.model import load_model
    from qlora_lite.recipe import load_recipe

    path = tmp_path / "moe.toml"
    # an fp32 merge: bf16 rounding flips near-tied routes of a random tiny MoE (its check would fail for that)
    path.write_text(recipe_text(tiny_moe, tiny_data, tmp_path / "runs", name="moe",
                                export='merge = true\ndtype = "fp32"'))
    run_dir = tmp_path / "runs" / "moe"
    steps = ["--set", "train.max_steps=6", "--set", "train.save_steps=3"]
    recipe = load_recipe(path, [s for s in steps if s != "--set"])

    # loaded as training loads it: the experts' bytes are 4-bit (half a byte a weight, plus constants)
    loaded = load_model(recipe.model, recipe.quantization, recipe.train, recipe.method)
    experts = [m for m in loaded.model.modules() if hasattr(m, "gate_up_proj_4bit")]
    assert len(experts) == 2
    numel = sum(e.gate_up_proj.numel() + e.down_proj.numel() for e in experts)
    stored = sum(b.numel() * b.element_size() for e in experts for b in e.buffers())
    assert 0.5 * numel <= stored <= 0.6 * numel

    # the plan counts them in 4-bit: no "stay in 16-bit" note, no 16-bit experts in its weights
    plan = memory.plan_from_arch(recipe, memory.recipe_arch(recipe))
    assert not any("stay in 16-bit" in n for n in plan.notes)
    assert memory.recipe_arch(recipe).fused_expert_params == 0

    assert main(["run", str(path), "--set", "train.max_steps=3", "--set", "train.save_steps=3"]) == 0
    first = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    expert_keys = [k for k in first if "experts" in k]
    assert expert_keys, sorted(first)  # all-linear: LoRA on the fused experts too
    assert any(first[k].abs().max() > 0 for k in expert_keys if "lora_B" in k)  # they trained (B starts at 0)
    check = json.loads((run_dir / "merged" / "merge_check.json").read_text())
    assert check["passed"], check  # the merged model reproduces the 4-bit model + adapter
    capsys.readouterr()

    assert main(["run", str(path), *steps, "--resume"]) == 0
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in losses if "loss" in r and r.get("event") != "end"]
    assert len(losses) == 6 and losses[-1] < losses[0]
