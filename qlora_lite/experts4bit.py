"""4-bit fused experts: after a 4-bit load, quantize each mixture-of-experts tensor expert by expert.

Since transformers 5, Mixtral, Qwen2/3-MoE, OLMoE (and most MoE families) store their experts as two fused 3-D
parameters, `gate_up_proj` (experts, 2 x intermediate, hidden) and `down_proj` (experts, hidden, intermediate).
bitsandbytes' 4-bit load replaces nn.Linear layers only, so these, most of the weights, stay 16-bit
(bitsandbytes#1849). Here each expert slice goes through bitsandbytes' own `quantize_4bit` (NF4/FP4, blocks of 64,
so no block straddles two experts, double quantization as the recipe asks), and the forward pass multiplies by one
expert at a time with `bnb.matmul_4bit`, as Linear4bit does: one expert in the compute dtype at a time, dequantized
again in the backward pass instead of being kept.

Thin on purpose: bitsandbytes' own `Experts4bit` (PRs #1965 / #1984, unreleased in 0.50) should replace this module
when it ships; `quantize_experts`, `dequantize_experts` and `route_lora` are the only entry points.

LoRA on experts stays PEFT's (`target_parameters`, a ParamWrapper per fused tensor, its adapter files unchanged):
`route_lora` makes each ParamWrapper over 4-bit experts hand its low-rank factors to the loop below, which adds
scaling * (x A_e^T) B_e^T to each expert's output, instead of letting PEFT add the delta to the whole 3-D tensor.
"""

from __future__ import annotations

import contextlib
import math
import types

import torch
from torch import nn

from qlora_lite.errors import UserError

BLOCKSIZE = 64  # bitsandbytes' 4-bit block; a block never spans two experts since each expert is quantized alone
NESTED_BLOCKSIZE = 256  # double quantization: the absmax constants are 8-bit in blocks of 256 (bitsandbytes' value)
WEIGHTS = ("gate_up_proj", "down_proj")
# built tiny and checked in tests/test_experts4bit.py; any family declared the same way runs the same loop
TESTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "phimoe", "granitemoe", "minimax", "ernie4_5_moe",
          "gemma4_text")


class Packed4bit(nn.Module):
    """One fused expert weight (experts, out, in) in 4 bits: each expert's packed bytes and constants, stacked."""

    def __init__(self, weight: torch.Tensor, quant_type: str, double_quant: bool, compute_dtype: torch.dtype):
        import bitsandbytes.functional as F

        super().__init__()
        packed, absmax, absmax2, offset = [], [], [], []
        for expert in weight.detach():
            data, state = F.quantize_4bit(expert, blocksize=BLOCKSIZE, compress_statistics=double_quant,
                                          quant_type=quant_type)
            packed.append(data.view(-1))
            absmax.append(state.absmax)
            if double_quant:
                absmax2.append(state.state2.absmax)
                offset.append(state.offset)
        self.register_buffer("packed", torch.stack(packed), persistent=False)  # saved under the weight's own name
        self.register_buffer("absmax", torch.stack(absmax))
        self.register_buffer("code", state.code)
        if double_quant:
            self.register_buffer("absmax2", torch.stack(absmax2))
            self.register_buffer("offset", torch.stack(offset))
            self.register_buffer("code2", state.state2.code)
        self.shape = tuple(weight.shape)
        self.quant_type, self.double_quant, self.dtype = quant_type, double_quant, compute_dtype

    def state(self, e: int):
        """bitsandbytes' QuantState of expert `e`: views of the stacked constants, nothing copied."""
        from bitsandbytes.functional import QuantState

        nested = QuantState(self.absmax2[e], code=self.code2, blocksize=NESTED_BLOCKSIZE,
                            dtype=torch.float32) if self.double_quant else None
        return QuantState(self.absmax[e], shape=torch.Size(self.shape[1:]), code=self.code, blocksize=BLOCKSIZE,
                          quant_type=self.quant_type, dtype=self.dtype,
                          offset=self.offset[e] if self.double_quant else None, state2=nested)

    def matmul(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x @ W_e^T, W_e dequantized inside bitsandbytes (forward and again in backward, never kept)."""
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.packed[e].view(-1, 1), self.state(e))

    def dequantize(self, e: int) -> torch.Tensor:
        import bitsandbytes.functional as F

        return F.dequantize_4bit(self.packed[e].view(-1, 1), self.state(e))

    def extra_repr(self) -> str:
        return f"shape={self.shape}, {self.quant_type}, double_quant={self.double_quant}"


def packed_bytes(shape: tuple[int, int, int], double_quant: bool) -> int:
    """Bytes a fused (experts, out, in) weight takes in 4 bits: two values a byte plus each expert's constants."""
    experts, out, inp = shape
    blocks = math.ceil(out * inp / BLOCKSIZE)
    constants = blocks if double_quant else 4 * blocks  # 8-bit absmax when double-quantized, fp32 otherwise
    nested = 4 * (math.ceil(blocks / NESTED_BLOCKSIZE) + 1) if double_quant else 0  # fp32 absmax2 + offset
    return experts * (math.ceil(out * inp / 2) + constants + nested) + 4 * (16 + (256 if double_quant else 0))


def fused_experts(model) -> list[tuple[str, nn.Module]]:
    """The experts modules (name, module) holding fused 3-D weights, checked: an experts module this loop cannot
    run (transposed, biased, ungated, or not declared through transformers' experts interface) is refused."""
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd) or isinstance(getattr(module, "gate_up_proj_4bit", None),
                                                                        Packed4bit):
            continue
        fused = [n for n, p in module.named_parameters(recurse=False) if p.ndim >= 3]
        if not fused or not ("Expert" in type(module).__name__ or hasattr(module, "has_gate")):
            continue
        why = _unsupported(module, fused)
        if why:
            raise UserError(
                f"model type {model_type!r}: its experts ({type(module).__name__} at {name}) are fused 3-D tensors "
                f"that qlora_lite cannot quantize to 4-bit ({why}); it quantizes gated experts stored (experts, out, "
                f"in) without bias, as in {', '.join(TESTED)}. Train it on a 16-bit base (method.kind = \"lora\", "
                f"or [quantization] load_in_4bit = false for a method that reads it), or use a model of those families")
        found.append((name, module))
    return found


def _unsupported(module: nn.Module, fused: list[str]) -> str | None:
    if not hasattr(module, "has_gate"):
        return "not declared through transformers' use_experts_implementation"
    flags = {"transposed": module.is_transposed, "biased": module.has_bias, "ungated": not module.has_gate,
             "normed after each expert": module.has_post_expert_norm, "expert-parallel": module._is_expert_parallel}
    if any(flags.values()):
        return ", ".join(k for k, v in flags.items() if v)
    if sorted(fused) != sorted(WEIGHTS):
        return f"its 3-D weights are {', '.join(fused)}, not {' and '.join(WEIGHTS)}"
    return None


def quantize_experts(model, quant_type: str, double_quant: bool, compute_dtype: torch.dtype) -> int:
    """Quantize every fused expert weight in place, expert by expert; the number of weights quantized (0 for a
    dense model). Call right after a 4-bit `from_pretrained`. Unsupported experts raise UserError first."""
    modules = fused_experts(model)
    for _, module in modules:
        _attach(module, _pack(module, quant_type, double_quant, compute_dtype))
    return len(modules) * len(WEIGHTS)


def _pack(module: nn.Module, quant_type: str, double_quant: bool, compute_dtype: torch.dtype) -> dict:
    """Each fused weight of `module` in 4 bits, {name: Packed4bit}; the 16-bit weights are dropped."""
    packs = {}
    for name in WEIGHTS:
        weight = getattr(module, name)
        packs[name] = Packed4bit(weight, quant_type, double_quant, compute_dtype)
        # PEFT's target_parameters finds, sizes and types LoRA from this parameter: same shape, dtype and device,
        # but one element of storage (stride 0). Its values are never read: the forward uses the 4-bit copy.
        delattr(module, name)
        placeholder = torch.zeros((), dtype=compute_dtype, device=weight.device).expand(weight.shape)
        module.register_parameter(name, nn.Parameter(placeholder, requires_grad=False))
        getattr(module, name)._is_hf_initialized = True  # transformers' loader must not initialize it
        del weight
    return packs


def _attach(module: nn.Module, packs: dict) -> None:
    for name, packed in packs.items():
        setattr(module, f"{name}_4bit", packed)
    module.forward = types.MethodType(_experts_forward, module)
    module._qlora_lite_hook = module._register_state_dict_hook(_state_dict_hook)


@contextlib.contextmanager
def quantized_as_loaded(quant_type: str, double_quant: bool, compute_dtype: torch.dtype):
    """Inside a 4-bit `from_pretrained`: quantize each experts module as soon as both of its weights are loaded, so
    loading holds one layer's 16-bit experts on the device, not the whole model's (Qwen3-30B-A3B: 1.1 GiB instead
    of 54 GiB, which no 24 GB card holds). Tied to transformers 5's loader: it sets each loaded parameter through
    core_model_loading.set_param_for_module, one at a time in this thread when it quantizes on the fly, and ends by
    replacing every non-persistent buffer (as Packed4bit.packed) with an empty one: the packed weights join their
    modules once it is done. Whatever this misses (another loader), quantize_experts after the load still
    quantizes, holding everything first."""
    from transformers import core_model_loading

    original = core_model_loading.set_param_for_module
    loaded: dict[str, set[str]] = {}  # experts module path -> its weights the loader has set (the others may hold
    # the skeleton's uninitialized values, which are not on the meta device when it loads to the CPU)
    pending: dict[nn.Module, dict] = {}  # experts module -> its packed weights, attached after the load

    def set_then_quantize(model, target_name, *args, **kwargs):
        original(model, target_name, *args, **kwargs)
        path, _, name = target_name.rpartition(".")
        if name not in WEIGHTS:
            return
        loaded.setdefault(path, set()).add(name)
        module = model.get_submodule(path)
        fused = [n for n, p in module.named_parameters(recurse=False) if p.ndim >= 3]
        if (loaded[path] == set(WEIGHTS) and module not in pending and hasattr(module, "has_gate")
                and not _unsupported(module, fused)):
            pending[module] = _pack(module, quant_type, double_quant, compute_dtype)

    core_model_loading.set_param_for_module = set_then_quantize
    try:
        yield
        for module, packs in pending.items():
            _attach(module, packs)
    finally:
        core_model_loading.set_param_for_module = original


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    """The packed bytes take the placeholder's key (cheap: PEFT reads the whole state dict at each adapter save),
    so a save_pretrained of the 4-bit model fails loudly on reload (shape mismatch) instead of loading zeros."""
    for name in WEIGHTS:
        state_dict[prefix + name] = getattr(module, f"{name}_4bit").packed


def _experts_forward(self, hidden_states, top_k_index, top_k_weights, lora=None):
    """transformers' eager experts loop (MixtralExperts.forward), each projection through the 4-bit expert; `lora`:
    {weight name: [(lhs, rhs, scaling)]} from PEFT, expert e's delta being scaling * lhs[e] @ rhs[e] (out, in)."""
    if lora is None and nn.utils.parametrize.is_parametrized(self):  # PEFT's own path: it would drop the adapter
        raise RuntimeError("LoRA on 4-bit experts: call qlora_lite.experts4bit.route_lora(model) after attaching the "
                           "adapter (get_peft_model, PeftModel.from_pretrained), or dequantize_experts(model) first")
    lora = lora or {}
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit.flatten().tolist():
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate_up = _project(self, "gate_up_proj", current_state, expert_idx, lora)
        current = _project(self, "down_proj", self._apply_gate(gate_up), expert_idx, lora)
        current = current * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
    return final_hidden_states


def _project(module, name: str, x: torch.Tensor, e: int, lora: dict) -> torch.Tensor:
    packed = getattr(module, f"{name}_4bit")
    x = x.to(packed.dtype)  # as Linear4bit: fp32 norms can hand fp32 activations to a bf16 model
    out = packed.matmul(x, e)
    for lhs, rhs, scaling in lora.get(name, ()):
        out = out + scaling * ((x @ rhs[e].transpose(0, 1)) @ lhs[e].transpose(0, 1))
    return out


def route_lora(model) -> int:
    """Make each PEFT ParamWrapper over 4-bit experts pass its LoRA factors to the 4-bit loop; the number routed.
    Call after get_peft_model. PEFT's own path would add the delta to the whole 3-D placeholder: a full 16-bit
    stack per forward, and wrong, as the placeholder holds no weights."""
    routed = 0
    for module in model.modules():
        base = _experts_under(module)
        if base is not None:
            module.forward = types.MethodType(_lora_forward, module)
            routed += 1
    return routed


def _experts_under(module):
    """The 4-bit experts module under a (possibly nested) ParamWrapper, or None."""
    if type(module).__name__ != "ParamWrapper":
        return None
    while type(module).__name__ == "ParamWrapper":
        module = module.base_layer
    return module if isinstance(getattr(module, "gate_up_proj_4bit", None), Packed4bit) else None


def _lora_forward(self, hidden_states, top_k_index, top_k_weights):
    """The forward of a ParamWrapper over 4-bit experts: the active adapters' factors of every nested wrapper."""
    lora, layer = {}, self
    while type(layer).__name__ == "ParamWrapper":
        if not layer.disable_adapters:
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    lora.setdefault(layer.parameter_name, []).append(layer.get_delta_factors(adapter))
        layer = layer.base_layer
    return _experts_forward(layer, hidden_states, top_k_index, top_k_weights, lora)


def dequantize_experts(model) -> int:
    """Put back fused Parameters in the compute dtype, dequantized expert by expert; the number restored. After it
    PEFT's own path (merge_and_unload, its forward) and save_pretrained see ordinary tensors again."""
    restored = 0
    for module in list(model.modules()):  # children are removed on the way
        if "forward" in vars(module) and getattr(module.forward, "__func__", None) is _lora_forward:
            del module.forward
        packed = getattr(module, "gate_up_proj_4bit", None)
        if not isinstance(packed, Packed4bit):
            continue
        for name in WEIGHTS:
            packed = getattr(module, f"{name}_4bit")
            weight = torch.empty(packed.shape, dtype=packed.dtype, device=packed.packed.device)
            for e in range(packed.shape[0]):
                weight[e] = packed.dequantize(e)
            delattr(module, name)
            delattr(module, f"{name}_4bit")
            module.register_parameter(name, nn.Parameter(weight, requires_grad=False))
            restored += 1
        del module.forward
        module._qlora_lite_hook.remove()
        del module._qlora_lite_hook
    return restored
