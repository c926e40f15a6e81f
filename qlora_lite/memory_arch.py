"""The model skeleton the memory planner reads: exact parameter counts and the shapes that set its byte figures.

Input: a `Recipe` and the model's `PretrainedConfig`. Output: an `Arch`. The model is built on the meta device (no
weights), 4-bit layers are chosen with transformers' own bitsandbytes rule, and the method is attached as model.py
attaches it: LoRA and prompt tuning with PEFT itself, every weight trainable for full fine-tuning. So the counts
equal `model.count_parameters` after `attach_method`.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import dataclass

from qlora_lite.errors import UserError
from qlora_lite.recipe import Recipe


@dataclass(frozen=True)
class ParamCount:
    trainable: int  # what the method trains: LoRA, the soft prompt, or every weight
    total: int  # count_parameters' figure: PEFT counts a packed 4-bit weight as numel * 2 (n rounded up to even)
    base: int  # plain count of the unquantized model, tied embeddings once


@dataclass(frozen=True)
class Arch:
    """What the planner needs from the skeleton, computed once per model and method."""

    method: str  # recipe.method.kind
    params: ParamCount
    quantized_numels: tuple[int, ...]  # weights of the 4-bit linear layers
    norm_params: int  # 1-D norm weights, upcast to fp32 by model.py (frozen bases)
    other_params: int  # the rest of a frozen base, kept in the compute dtype
    trainable_shapes: tuple[tuple[int, ...], ...]  # each trainable tensor, in parameter order
    embedding_indices: tuple[int, ...]  # which of them are nn.Embedding weights (32-bit state in 8-bit optimizers)
    lora_inputs: tuple[tuple[str, int, bool], ...]  # (stream, in_features, reads attention output) of block 0
    linear_inputs: tuple[tuple[str, int, int, bool], ...]  # block 0: (stream, in_features, layers reading, reads att.)
    cast_params: int  # trainable fp32 weights autocast casts (linear layers; TRL casts the LM head itself)
    block_cast_params: int  # of them, in the largest block
    largest_linear: int  # the largest trainable weight in a block: its gradient's temporaries
    virtual_tokens: int  # prompt tuning: tokens PEFT prepends to every (encoder) sequence
    is_encoder_decoder: bool
    hidden: int
    intermediate: int
    layers: int
    decoder_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    mlp_saved: int  # tensors of intermediate width saved by the MLP's activation and gate product
    attention: str  # "sdpa" or "eager"
    dropout: float  # the model's own dropout (T5: 0.1), not LoRA's


def analyze(recipe: Recipe, config) -> Arch:
    """Build the model on the meta device, mark the 4-bit layers, attach the method; count what exists."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = copy.deepcopy(config)  # from_config writes the attention implementation into it
    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    auto = AutoModelForSeq2SeqLM if enc_dec else AutoModelForCausalLM
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
        quantized = _quantized_weights(model) if recipe.load_in_4bit else {}
        base = dict(model.named_parameters())  # tied weights appear once
        blocks = _first_blocks(model)
        head = None if enc_dec else model.get_output_embeddings()  # TRL's fused head casts it tile by tile
        mlp_saved, linear_inputs = _mlp_saved(model, config), _linear_inputs(blocks)
        wrapped = _attach(recipe, model, enc_dec)
    trainable = {id(p): p for p in wrapped.parameters() if p.requires_grad}
    embeddings = {id(m.weight) for m in wrapped.modules() if isinstance(m, torch.nn.Embedding)}
    casts = _cast_params(wrapped, trainable, head)
    block_casts = [_cast_params(block, trainable, head) for block in blocks.values()]
    q_numels = tuple(base[n].numel() for n in quantized)
    norm = sum(p.numel() for n, p in base.items() if p.ndim == 1 and "norm" in n.lower() and n not in quantized)
    base_count = sum(p.numel() for p in base.values())
    trained = sum(p.numel() for p in trainable.values())
    packed = sum(2 * math.ceil(n / 2) for n in q_numels)  # Params4bit packs two values per byte
    adapter = trained if recipe.has_adapter else 0
    return Arch(
        method=recipe.method.kind,
        params=ParamCount(trained, base_count - sum(q_numels) + packed + adapter, base_count),
        quantized_numels=q_numels, norm_params=norm, other_params=base_count - sum(q_numels) - norm,
        trainable_shapes=tuple(tuple(p.shape) for p in trainable.values()),
        embedding_indices=tuple(i for i, key in enumerate(trainable) if key in embeddings),
        lora_inputs=_lora_inputs(wrapped),
        linear_inputs=linear_inputs, cast_params=sum(casts.values()),
        block_cast_params=max((sum(c.values()) for c in block_casts), default=0),
        largest_linear=max((n for c in block_casts for n in c.values()), default=0),
        virtual_tokens=recipe.method.num_virtual_tokens if recipe.method.kind == "prompt_tuning" else 0,
        is_encoder_decoder=enc_dec, mlp_saved=mlp_saved, **_dims(config),
        attention=model.config._attn_implementation or "eager", dropout=getattr(config, "dropout_rate", 0.0))


def _attach(recipe: Recipe, model, enc_dec: bool):
    """The method on the skeleton: PEFT's own LoRA or prompt tuning; full fine-tuning trains every weight (a
    fresh model's parameters all require grad). The prompt's init text changes values, not shapes; PEFT gives T5 a
    prompt per stack (num_transformer_submodules = 2) and trains both, though only the encoder's is used."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    task = "SEQ_2_SEQ_LM" if enc_dec else "CAUSAL_LM"
    if recipe.method.kind == "full":
        return model
    if recipe.method.kind == "prompt_tuning":
        tokens = recipe.method.num_virtual_tokens
        return get_peft_model(model, PromptTuningConfig(task_type=task, num_virtual_tokens=tokens))
    lora = recipe.lora
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    try:
        return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=targets, task_type=task))
    except ValueError as e:
        raise UserError(f"lora.target_modules: {e}") from None


def _dims(config) -> dict[str, int]:
    """Sizes under their Llama names; T5's config maps most of them (d_model, num_heads), not d_ff or d_kv."""
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    return dict(
        hidden=config.hidden_size, intermediate=getattr(config, "intermediate_size", None) or config.d_ff,
        layers=layers, decoder_layers=getattr(config, "num_decoder_layers", None) or layers, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads, vocab=config.vocab_size,
        head_dim=getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads)


def _quantized_weights(model) -> dict[str, None]:
    """Names of the weights bitsandbytes will hold in 4-bit: transformers' own rule (skip the output head, tied
    weights and `_keep_in_fp32_modules`, e.g. T5's `wo`), applied to exact `nn.Linear` layers."""
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    return {f"{name}.weight": None for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and should_convert_module(name, skip)}


def _first_blocks(model) -> dict[str, object]:
    """Block 0 of each stack (one for a decoder, encoder and decoder for T5), by name."""
    return {name: module for name, module in model.named_modules()
            if name.endswith(".0") and not any(part.isdigit() for part in name.split(".")[:-1])}


def _stream(name: str) -> str:
    """"cross" = T5's cross-attention k/v, which run over the encoder's tokens; else the stack's own tokens."""
    if "EncDecAttention" in name and name.rsplit(".", 1)[-1] in ("k", "v"):
        return "cross"
    return "enc" if ".encoder." in f".{name}" else "dec"


def _reads_attention(name: str) -> bool:
    return re.search(r"(attn|attention)\.(o_proj|o|out_proj|dense)$", name, re.IGNORECASE) is not None


def _lora_inputs(peft_model) -> tuple[tuple[str, int, bool], ...]:
    """(stream, in_features, whether it reads the attention output) of each LoRA layer in block 0 of each stack."""
    found = []
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        first_index = re.search(r"\.(\d+)\.", name)
        if first_index is None or first_index.group(1) != "0":
            continue
        found.append((_stream(name), module.in_features, _reads_attention(name)))
    return tuple(found)


def _linear_inputs(blocks: dict) -> tuple[tuple[str, int, int, bool], ...]:
    """The distinct inputs of block 0's linear layers: layers of one parent reading the same width in the same
    stream share an input (q/k/v, gate/up), each saved once in fp32 and cast once per layer under autocast."""
    import torch

    groups: dict[tuple, int] = {}
    for prefix, block in blocks.items():
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear):
                full = f"{prefix}.{name}"
                key = (full.rsplit(".", 1)[0], _stream(full), module.in_features, _reads_attention(full))
                groups[key] = groups.get(key, 0) + 1
    return tuple((stream, n_in, count, reads) for (_, stream, n_in, reads), count in groups.items())


def _cast_params(module, trainable: dict, head) -> dict[int, int]:
    """Trainable fp32 weights and biases of the linear layers in `module` (id -> numel): what autocast casts."""
    import torch

    skip = {id(p) for p in head.parameters()} if head is not None else set()
    return {id(p): p.numel() for m in module.modules() if isinstance(m, torch.nn.Linear)
            for p in m.parameters(recurse=False) if id(p) in trainable and id(p) not in skip}


def _mlp_saved(model, config) -> int:
    """Intermediate-width tensors the MLP saves: the activation's own (gelu_new: 4, silu/relu/gelu: 1) plus the
    two factors of the gate product when the MLP is gated (two projections to the width, or one fused to 2x)."""
    import torch

    width = getattr(config, "intermediate_size", None) or config.d_ff
    act = getattr(config, "dense_act_fn", None) or getattr(config, "hidden_act", "silu")
    block = next(m for n, m in model.named_modules() if re.search(r"\.0$", n))
    outs = [m.out_features for m in block.modules() if isinstance(m, torch.nn.Linear)]
    gated = outs.count(width) >= 2 or 2 * width in outs
    return (4 if act == "gelu_new" else 1) + (2 if gated else 0)
