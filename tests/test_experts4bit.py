"""4-bit fused experts (qlora_lite.experts4bit) on tiny Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE models (and six
other families fused the same way): built from configs, saved, loaded through the real 4-bit from_pretrained, then
quantized expert by expert."""

from __future__ import annotations

import warnings

import pytest
import torch

from qlora_lite.errors import UserError
from qlora_lite.experts4bit import (WEIGHTS, Packed4bit, dequantize_experts, fused_experts, packed_bytes,
                                    quantize_experts, route_lora)

HIDDEN, LAYERS, EXPERTS, VOCAB = 64, 2, 4, 128


FAMILIES = {  # what each config calls its experts and their width; 4 experts, top 2
    "mixtral": dict(num_local_experts=EXPERTS, intermediate_size=128),
    "qwen2_moe": dict(num_experts=EXPERTS, moe_intermediate_size=128, intermediate_size=128,
                      shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=EXPERTS, moe_intermediate_size=128, intermediate_size=128, head_dim=16),
    "olmoe": dict(num_experts=EXPERTS, intermediate_size=128),
}
OTHER_FAMILIES = {  # fused the same way (transformers' experts interface, gated, untransposed, no bias)
    "glm4_moe": dict(n_routed_experts=4, moe_intermediate_size=64, intermediate_size=128, first_k_dense_replace=0,
                     n_group=1, topk_group=1, head_dim=16),
    "phimoe": dict(num_local_experts=4, intermediate_size=64),
    "granitemoe": dict(num_local_experts=4, intermediate_size=64),
    "minimax": dict(num_local_experts=4, intermediate_size=64, head_dim=16, layer_types=["full_attention"] * 2),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_intermediate_size=64, intermediate_size=128, moe_k=2),
    # 32 experts: bitsandbytes' CPU path needs a multiple of 32 outputs in its router's Linear4bit
    "gemma4_text": dict(enable_moe_block=True, num_experts=32, top_k_experts=2, moe_intermediate_size=64,
                        intermediate_size=128, head_dim=16, global_head_dim=16, sliding_window=16,
                        layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0),
}


def tiny_config(family: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        family, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False,
        **(FAMILIES | OTHER_FAMILIES)[family])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> the folder of its saved tiny model, built on first use."""
    from transformers import AutoModelForCausalLM

    paths = {}

    def path(family: str):
        if family not in paths:
            torch.manual_seed(0)
            paths[family] = tmp_path_factory.mktemp(family)
            AutoModelForCausalLM.from_config(tiny_config(family)).save_pretrained(paths[family])
        return paths[family]
    return path


def load_4bit(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # Qwen2-MoE's shared_expert_gate is a Linear(hidden, 1): bitsandbytes 0.50's CPU inference path repacks 4-bit
    # weights in blocks of 32 outputs and asserts on it, so it stays 16-bit here (a CPU-only limit, not ours)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype,
                                llm_int8_skip_modules=["lm_head", "shared_expert_gate"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=dtype)


def tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (the placeholders share one)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


def round_trip(weight):
    """Each expert slice through bitsandbytes' NF4 quantize -> dequantize, as an independent reference."""
    import bitsandbytes.functional as F

    out = torch.empty_like(weight)
    for e, expert in enumerate(weight):
        data, state = F.quantize_4bit(expert, blocksize=64, compress_statistics=True, quant_type="nf4")
        out[e] = F.dequantize_4bit(data, state)
    return out


def experts_modules(model):
    return [m for _, m in fused_experts(model)] or [m for m in model.modules() if hasattr(m, "gate_up_proj_4bit")]


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", [*FAMILIES, *OTHER_FAMILIES])
def test_experts_are_stored_in_4bit_and_compute_the_round_tripped_model(saved, family):
    model = load_4bit(saved(family))
    with torch.no_grad():
        logits_16bit = model(IDS).logits
    shapes = [tuple(getattr(m, name).shape) for m in experts_modules(model) for name in WEIGHTS]
    numel = sum(e * o * i for e, o, i in shapes)
    before = tensor_bytes(model)
    reference = {id(m): {name: round_trip(getattr(m, name).detach()) for name in WEIGHTS}
                 for m in experts_modules(model)}
    modules = experts_modules(model)

    assert quantize_experts(model, "nf4", True, torch.float32) == len(shapes) > 0
    saved_bytes = before - tensor_bytes(model)
    expert_bytes = sum(packed_bytes(s, True) for s in shapes)
    assert saved_bytes == 4 * numel - expert_bytes - 4 * len(shapes)  # fp32 gone; 4-bit + one placeholder element
    codes = 4 * (16 + 256) * len(shapes)  # the NF4 and 8-bit code tables, one per weight: fixed, not per expert
    assert 0.5 < (expert_bytes - codes) / numel < 0.53  # half a byte a weight, 1/64 for the 8-bit absmax, a little
    with torch.no_grad():
        logits_4bit = model(IDS).logits

    dequantize_experts(model)  # then put the independent round trip in and run transformers' own forward
    for m in modules:
        for name in WEIGHTS:
            getattr(m, name).data.copy_(reference[id(m)][name])
    with torch.no_grad():
        logits_reference = model(IDS).logits
    torch.testing.assert_close(logits_4bit, logits_reference, atol=1e-5, rtol=1e-5)
    # NF4 noise, as for any 4-bit layer: 0.03 at most here, 0.22 for the random tiny Gemma-4, whose logits the
    # round trip moves as much through transformers' own forward (the assert_close above)
    limit = 0.3 if family == "gemma4_text" else 0.05
    assert (logits_4bit - logits_16bit).norm() < limit * logits_16bit.norm()


@pytest.mark.parametrize("family", [*FAMILIES, *OTHER_FAMILIES])
def test_experts_are_quantized_as_they_load_one_layer_of_16bit_at_a_time(saved, family, monkeypatch):
    """model.load_model loads under quantized_as_loaded: each experts module is quantized as soon as both of its
    weights are in, so loading never holds more than one layer's 16-bit experts (without it, every layer's: for
    Qwen3-30B-A3B 54 GiB on the GPU before any was quantized), and the model is the one quantized after loading."""
    from transformers import core_model_loading

    from qlora_lite.experts4bit import quantized_as_loaded

    set_param = core_model_loading.set_param_for_module
    held = []  # after each parameter the loader sets: how many experts modules hold 16-bit weights

    def counting(model, *args, **kwargs):
        set_param(model, *args, **kwargs)
        held.append(sum(any(p.ndim == 3 and p.stride(0) != 0 and p.device.type != "meta"
                            for n, p in m.named_parameters(recurse=False) if n in WEIGHTS) for m in model.modules()))

    monkeypatch.setattr(core_model_loading, "set_param_for_module", counting)
    reference = load_4bit(saved(family))
    layers = len(fused_experts(reference))  # of the 2 (Ernie-4.5's first is dense)
    assert max(held) == layers  # a plain load holds them all
    held.clear()
    with quantized_as_loaded("nf4", True, torch.float32):
        model = load_4bit(saved(family))
    assert max(held) == 1
    assert core_model_loading.set_param_for_module is counting  # put back as it was
    assert fused_experts(model) == [] and len([m for m in model.modules() if hasattr(m, "gate_up_proj_4bit")]) == layers
    assert quantize_experts(model, "nf4", True, torch.float32) == 0  # what load_model calls next: nothing left
    quantize_experts(reference, "nf4", True, torch.float32)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)


def test_one_expert_at_a_time_in_forward_and_backward(saved, monkeypatch):
    """Every multiply sees one expert's packed bytes; the backward dequantizes one expert's 2-D weight per call."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    model = load_4bit(saved("mixtral"))
    quantize_experts(model, "nf4", True, torch.float32)
    expert_shapes = {m.gate_up_proj_4bit.shape[1:] for m in experts_modules(model)} | {
        m.down_proj_4bit.shape[1:] for m in experts_modules(model)}
    seen, dequantized = [], []
    matmul_4bit, dequantize_4bit = bnb.matmul_4bit, F.dequantize_4bit

    def recording_matmul(x, packed, *args, **kwargs):  # Linear4bit passes quant_state by keyword
        state = kwargs.get("quant_state") or args[0]
        seen.append((packed.numel(), tuple(state.shape)))
        return matmul_4bit(x, packed, *args, **kwargs)

    def recording_dequantize(packed, state, *args, **kwargs):
        out = dequantize_4bit(packed, state, *args, **kwargs)
        dequantized.append(tuple(out.shape))
        return out

    monkeypatch.setattr(bnb, "matmul_4bit", recording_matmul)
    monkeypatch.setattr(F, "dequantize_4bit", recording_dequantize)
    embeddings = model.get_input_embeddings()(IDS).detach().requires_grad_()
    model(inputs_embeds=embeddings).logits.sum().backward()
    expert_calls = [s for s in seen if s[1] in expert_shapes]
    assert expert_calls and all(n * 2 == s[0] * s[1] for n, s in expert_calls)
    experts_dequantized = [s for s in dequantized if s in expert_shapes]
    assert len(experts_dequantized) >= len(expert_calls)  # the backward of each expert multiply, at least
    assert all(len(s) == 2 for s in dequantized)
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_lora_on_4bit_experts_trains_through_peft_target_parameters(saved, family):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_4bit(saved(family))
    quantize_experts(model, "nf4", True, torch.float32)
    packed = {n: b.clone() for n, b in model.named_buffers() if n.endswith("packed")}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=list(WEIGHTS))
    model = get_peft_model(model, config)
    assert route_lora(model) == 2 * LAYERS
    experts_lora = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n and p.requires_grad}
    assert len(experts_lora) == 2 * 2 * LAYERS  # lora_A and lora_B of both fused weights in each layer
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    now = dict(model.named_parameters())
    assert all(not torch.equal(now[n], before) for n, before in experts_lora.items())
    assert all(torch.equal(b, packed[n.removeprefix("base_model.model.").replace(".base_layer", "")])
               for n, b in model.named_buffers() if n.endswith("packed"))  # the base did not move

    with torch.no_grad():
        lora_logits = model(IDS).logits
        with model.disable_adapter():
            base_logits = model(IDS).logits
    assert (lora_logits - base_logits).abs().max() > 1e-3  # the adapter is really applied, and really removable


def test_bf16_compute_under_autocast_with_fp32_norms_as_training_runs_it(saved):
    """A bf16 base whose norms freeze_base made fp32 hands fp32 activations to the experts: cast, as Linear4bit does."""
    from peft import LoraConfig, get_peft_model

    from qlora_lite.model import freeze_base
    from qlora_lite.recipe import TrainRecipe

    model = load_4bit(saved("mixtral"), torch.bfloat16)
    quantize_experts(model, "nf4", True, torch.bfloat16)
    freeze_base(model, TrainRecipe(max_steps=1, gradient_checkpointing=False))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=[], target_parameters=list(WEIGHTS)))
    route_lora(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert torch.isfinite(loss) and grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_an_adapter_attached_without_route_lora_fails_loudly_instead_of_being_ignored(saved):
    from peft import LoraConfig, get_peft_model

    model = load_4bit(saved("olmoe"))
    quantize_experts(model, "nf4", True, torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=[], target_parameters=list(WEIGHTS)))
    with pytest.raises(RuntimeError, match="route_lora"), torch.no_grad():
        model(IDS)


@pytest.mark.parametrize("family", [*FAMILIES, *OTHER_FAMILIES])
def test_the_projects_wrap_lora_routes_all_linear_experts_through_the_4bit_loop(saved, family):
    """lora.wrap_lora as training calls it (freeze_base, reentrant checkpointing, all-linear): all-linear adapts the
    fused experts in every family (PEFT adds them itself for Mixtral, Qwen3-MoE, OLMoE...; wrap_lora names them
    for Qwen2-MoE, Gemma-4 and the others), and their wrappers run the 4-bit loop."""
    from qlora_lite.experts4bit import _lora_forward
    from qlora_lite.lora import wrap_lora
    from qlora_lite.model import freeze_base
    from qlora_lite.recipe import LoraRecipe, TrainRecipe

    torch.manual_seed(0)
    model = load_4bit(saved(family))
    layers = len(fused_experts(model))
    quantize_experts(model, "nf4", True, torch.float32)
    freeze_base(model, TrainRecipe(max_steps=1))
    model = wrap_lora(model, LoraRecipe(r=4, dropout=0.0), is_encoder_decoder=False)
    routed = [m for m in model.modules() if getattr(m.forward, "__func__", None) is _lora_forward]
    assert len(routed) == 2 * layers  # the two nested ParamWrappers (gate_up_proj, down_proj) of each layer
    model.train()
    experts_lora = {n: p for n, p in model.named_parameters() if "experts" in n and p.requires_grad}
    model(IDS, labels=IDS).loss.backward()
    assert experts_lora and all(p.grad is not None for p in experts_lora.values())
    assert all(p.grad.abs().sum() > 0 for n, p in experts_lora.items() if "lora_B" in n)  # B = 0: A's grad is 0


def test_dequantize_experts_restores_parameters_and_merge_matches(saved):
    """After dequantize_experts the fused weights are the dequantized experts, PEFT's own path computes what the
    4-bit loop computed, and merge_and_unload keeps it (checked on one experts block: whole-model logits of a
    random tiny MoE can flip a near-tied routing on float noise)."""
    import bitsandbytes.functional as F
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_4bit(saved("mixtral"))
    quantize_experts(model, "nf4", True, torch.float32)
    packed = {(id(m), name): getattr(m, f"{name}_4bit") for m in experts_modules(model) for name in WEIGHTS}
    expected = {key: torch.stack([F.dequantize_4bit(p.packed[e].view(-1, 1), p.state(e)) for e in range(EXPERTS)])
                for key, p in packed.items()}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=list(WEIGHTS),
                        init_lora_weights=False)  # random A and B: a delta that shows
    model = get_peft_model(model, config)
    route_lora(model)
    hidden = torch.randn(10, HIDDEN)
    top_k_index = torch.stack([torch.randperm(EXPERTS)[:2] for _ in range(10)])
    top_k_weights = torch.rand(10, 2)
    block = lambda m: m.model.layers[0].mlp.experts  # noqa: E731
    with torch.no_grad():
        out_4bit = block(model.base_model.model)(hidden, top_k_index, top_k_weights)

    assert dequantize_experts(model) == 2 * LAYERS
    restored = {m for m in model.modules() if (id(m), "down_proj") in packed}
    for m in restored:
        assert not any(isinstance(c, Packed4bit) for c in m.children())
        for name in WEIGHTS:
            weight = getattr(m, name)
            assert weight.dtype == torch.float32 and weight.stride()[0] > 0
            assert torch.equal(weight, expected[(id(m), name)])
    with torch.no_grad():
        out_peft = block(model.base_model.model)(hidden, top_k_index, top_k_weights)  # PEFT's own path now
        merged = model.merge_and_unload()
        out_merged = block(merged)(hidden, top_k_index, top_k_weights)
        logits_merged = merged(IDS).logits
    torch.testing.assert_close(out_peft, out_4bit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_merged, out_4bit, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(logits_merged).all()
    assert all(p.ndim != 3 or p.stride()[0] > 0 for p in merged.state_dict().values())


def test_saving_a_4bit_experts_model_is_not_reloadable_by_mistake(saved, tmp_path):
    """state_dict is cheap (PEFT reads it at every adapter save) and holds the packed bytes under the weights' own
    names: a save_pretrained of the 4-bit model refuses to load again (shape mismatch) rather than loading zeros."""
    from transformers import AutoModelForCausalLM

    model = load_4bit(saved("olmoe"))
    quantize_experts(model, "nf4", True, torch.float32)
    state = model.state_dict()
    key = next(k for k in state if k.endswith("experts.gate_up_proj"))
    assert state[key].dtype == torch.uint8 and state[key].shape == (EXPERTS, 2 * 128 * HIDDEN // 2)
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="mismatched"):
        AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")


def test_dense_models_and_repeated_calls_quantize_nothing(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=VOCAB))
    assert quantize_experts(dense, "nf4", True, torch.float32) == 0
    model = load_4bit(saved("mixtral"))
    assert quantize_experts(model, "fp4", False, torch.float32) == 2 * LAYERS
    assert quantize_experts(model, "fp4", False, torch.float32) == 0
    packed = model.model.layers[0].mlp.experts.gate_up_proj_4bit
    assert packed.quant_type == "fp4" and not packed.double_quant
    assert sum(b.numel() * b.element_size() for b in packed.buffers()) == packed_bytes(packed.shape, False)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_experts_this_loop_cannot_run_are_refused_naming_the_model_type():
    from torch import nn
    from transformers import GptOssConfig, GptOssForCausalLM

    class FakeExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4, 8, 8))

    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"model_type": "fake_moe"})()
            self.experts = FakeExperts()

    with pytest.raises(UserError, match=r"model type 'fake_moe'.*FakeExperts.*load_in_4bit = false"):
        quantize_experts(Fake(), "nf4", True, torch.float32)
    with torch.device("meta"):
        gpt_oss = GptOssForCausalLM(GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                 num_local_experts=4, vocab_size=VOCAB))
    with pytest.raises(UserError, match=r"model type 'gpt_oss'.*transposed, biased"):
        quantize_experts(gpt_oss, "nf4", True, torch.float32)
