"""The model skeleton the memory planner reads: exact parameter counts and the shapes that set its byte figures.

Input: a `Recipe` and the model's `PretrainedConfig`. Output: an `Arch`. The model is built on the meta device (no
weights), 4-bit layers are chosen with transformers' own bitsandbytes rule, and the method is attached by the
function training uses, `model.attach_method`. So the counts equal `model.count_parameters` after it.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import asdict, dataclass

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
    model_type: str  # config.model_type: the byte model is checked on CHECKED_TYPES
    experts: int  # mixture-of-experts layers' experts (0: a dense model)
    fused_expert_params: int  # experts stored as 3-D tensors (transformers 5): bitsandbytes leaves them 16-bit
    fused_experts_adapted: bool  # PEFT put LoRA on them (it does for Mixtral under all-linear, not for Qwen2-MoE)
    experts_4bit: int  # fused expert weights model.load_model quantizes expert by expert (experts4bit)
    expert_mlp: tuple[int, int]  # with them: (experts each token runs, an expert's intermediate width), else (0, 0)
    params: ParamCount
    quantized_numels: tuple[int, ...]  # weights of the 4-bit linear layers
    norm_params: int  # 1-D norm weights, upcast to fp32 by model.py (frozen bases)
    other_params: int  # the rest of a frozen base, kept in the compute dtype
    trainable_shapes: tuple[tuple[int, ...], ...]  # each trainable tensor, in parameter order
    embedding_indices: tuple[int, ...]  # which of them are nn.Embedding weights (32-bit state in 8-bit optimizers)
    lora_inputs: tuple[tuple[str, int, bool], ...]  # (stream, in_features, reads attention output) of block 0
    ia3_scaled: tuple[tuple[str, int], ...]  # block 0: (stream, width) of each IA3 vector's scaled tensor
    dora_outputs: tuple[tuple[str, int], ...]  # block 0: (stream, out_features) of each DoRA layer
    dora_weight: int  # DoRA: the largest adapted weight, rebuilt (dequantized, plus B @ A) per layer and forward
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
    dropout: float  # the model's own dropout on the residual stream (T5: 0.1), not LoRA's
    attention_dropout: float  # on the attention probabilities
    activation_dropout: float  # on the MLP's intermediate activation
    block_norms: tuple[tuple[str, int], ...]  # (stream, norm layers in a block): Llama 2, Gemma-2 4, T5's decoder 3
    relative_bias: bool  # T5-style relative position bias (a float tensor per head), instead of a padding mask
    max_positions: int | None  # config.max_position_embeddings: the longest sequence it was trained on (T5: None)
    max_positions_key: str  # its name in config.json (GPT-2: n_positions)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Arch:
        """The inverse of to_json, exactly: JSON keeps ints, floats, strs and bools; lists become tuples again."""
        def tuples(value):
            return tuple(tuples(v) for v in value) if isinstance(value, list) else value

        return cls(**{k: tuples(v) for k, v in data.items()} | {"params": ParamCount(**data["params"])})


def analyze(recipe: Recipe, config) -> Arch:
    """Build the model on the meta device, mark the 4-bit layers, attach the method; count what exists."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = copy.deepcopy(config)  # from_config writes the attention implementation into it
    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    auto = AutoModelForSeq2SeqLM if enc_dec else AutoModelForCausalLM
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = auto.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
        except Exception as e:  # an inconsistent config.json (e.g. pad_token_id outside the vocabulary)
            raise UserError(f"model.name = {recipe.model.name!r}: transformers cannot build a "
                            f"{config.model_type} model from its config.json ({type(e).__name__}: {e})") from None
        quantized = _quantized_weights(model) if recipe.load_in_4bit else {}
        experts = _quantized_experts(model) if recipe.load_in_4bit else {}  # fused MoE weights, 4-bit per expert
        base = dict(model.named_parameters())  # tied weights appear once
        blocks = _first_blocks(model)
        head = None if enc_dec else model.get_output_embeddings()  # TRL's fused head casts it tile by tile
        dims = _dims(config, blocks, _stack_lengths(model, blocks))
        mlp_saved, linear_inputs = _mlp_saved(blocks, config, dims["intermediate"]), _linear_inputs(blocks)
        # counted before the method is attached: LN tuning wraps each norm beside its trainable copy
        block_norms = tuple((_stream(name), _norm_count(block)) for name, block in blocks.items())
        # model.py imports torch and transformers at its top, which a cached plan never needs: imported here
        from qlora_lite.model import LoadedModel, attach_method

        skeleton = LoadedModel(model, None, enc_dec, "meta", torch.float32, source=None)
        wrapped = attach_method(skeleton, recipe)  # what training attaches; PEFT gives T5 a prompt per stack
    trainable = {id(p): p for p in wrapped.parameters() if p.requires_grad}
    embeddings = {id(m.weight) for m in wrapped.modules() if isinstance(m, torch.nn.Embedding)}
    casts = _cast_params(wrapped, trainable, head)
    block_casts = [_cast_params(block, trainable, head) for block in blocks.values()]
    q_numels = tuple(base[n].numel() for n in quantized)
    q_numels += tuple(out * inp for e, out, inp in experts.values() for _ in range(e))
    norm = sum(p.numel() for n, p in base.items() if p.ndim == 1 and "norm" in n.lower() and n not in quantized)
    base_count = sum(p.numel() for p in base.values())
    trained = sum(p.numel() for p in trainable.values())
    packed = sum(2 * math.ceil(n / 2) for n in q_numels)  # Params4bit packs two values per byte
    adapter = trained if recipe.has_adapter else 0
    return Arch(
        method=recipe.method.kind, model_type=config.model_type, experts=_experts(config),
        fused_expert_params=sum(p.numel() for n, p in base.items() if p.ndim >= 3 and n not in experts),
        fused_experts_adapted=any(type(m).__name__ == "ParamWrapper" for m in wrapped.modules()),
        experts_4bit=sum(math.prod(shape) for shape in experts.values()),
        expert_mlp=(_top_k(config), max(shape[2] for name, shape in experts.items() if name.endswith("down_proj")))
        if experts else (0, 0),
        params=ParamCount(trained, base_count - sum(q_numels) + packed + adapter, base_count),
        quantized_numels=q_numels, norm_params=norm, other_params=base_count - sum(q_numels) - norm,
        trainable_shapes=tuple(tuple(p.shape) for p in trainable.values()),
        embedding_indices=tuple(i for i, key in enumerate(trainable) if key in embeddings),
        lora_inputs=_lora_inputs(wrapped), ia3_scaled=_block0(wrapped, "ia3"), dora_outputs=_block0(wrapped, "dora"),
        dora_weight=max((m.in_features * m.out_features for m in wrapped.modules() if _uses_dora(m)), default=0),
        linear_inputs=linear_inputs, cast_params=sum(casts.values()),
        block_cast_params=max((sum(c.values()) for c in block_casts), default=0),
        largest_linear=max((n for c in block_casts for n in c.values()), default=0),
        virtual_tokens=recipe.method.num_virtual_tokens if recipe.method.spec.trains == "soft prompt" else 0,
        is_encoder_decoder=enc_dec, mlp_saved=mlp_saved, **dims,
        attention=model.config._attn_implementation or "eager", **_dropouts(config),
        block_norms=block_norms,
        relative_bias=any("relative_attention_bias" in name for name, _ in model.named_modules()),
        **_max_positions(config))


def _max_positions(config) -> dict:
    """max_position_embeddings (GPT-2's n_positions maps to it); None where positions are relative (T5)."""
    text = config.get_text_config()
    value = getattr(text, "max_position_embeddings", None)
    return dict(max_positions=value if isinstance(value, int) and value > 0 else None,
                max_positions_key=text.attribute_map.get("max_position_embeddings", "max_position_embeddings"))


def _dims(config, blocks: dict, lengths: list[int]) -> dict[str, int]:
    """Sizes under their Llama names. Layer counts and the MLP width come from the skeleton itself (configs name them
    n_layer, encoder_layers, d_ff, ffn_dim, n_inner...); heads from the config, whose attribute_map gives every
    family num_attention_heads. The MLP width is the widest input of a block's linear layers (its down projection)."""
    stacks = list(blocks.values())
    heads, hidden = config.num_attention_heads, config.hidden_size
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None)
    if kv_heads is None and getattr(config, "multi_query", False):  # Falcon-7B: one k/v head
        kv_heads = 1
    return dict(
        hidden=hidden, intermediate=max(shape[0] for shape in _linear_shapes(stacks[0]).values()),
        layers=lengths[0], decoder_layers=lengths[-1], heads=heads,
        kv_heads=kv_heads or heads, vocab=config.vocab_size,
        head_dim=getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads)


def _stack_lengths(model, blocks: dict) -> list[int]:
    """Blocks in each stack: the length of the list holding each first block."""
    modules = dict(model.named_modules())
    return [len(modules[name.rsplit(".", 1)[0]]) for name in blocks]


def _quantized_experts(model) -> dict[str, tuple[int, int, int]]:
    """Fused expert weights model.load_model quantizes expert by expert (experts4bit): name -> (experts, out, in).
    A family it cannot quantize is refused here as there, so plan and run say the same."""
    from qlora_lite.experts4bit import WEIGHTS, fused_experts

    return {f"{name}.{w}": tuple(getattr(module, w).shape) for name, module in fused_experts(model) for w in WEIGHTS}


def _top_k(config) -> int:
    return next((getattr(config, k) for k in ("num_experts_per_tok", "top_k_experts", "moe_k", "top_k")
                 if isinstance(getattr(config, k, None), int)), 1)


def _experts(config) -> int:
    return next((getattr(config, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                 if isinstance(getattr(config, k, None), int)), 0)


def _dropouts(config) -> dict[str, float]:
    """The model's own dropout rates, active in training, under the names configs use: residual (T5 dropout_rate,
    GPT-2 resid_pdrop, OPT/BART dropout, Falcon/BLOOM hidden_dropout), attention and activation. T5 applies its one
    rate everywhere; other families without a separate key have none there (Llama-family configs set none at all)."""
    def first(*keys, default=0.0):
        found = [getattr(config, k) for k in keys if isinstance(getattr(config, k, None), (int, float))]
        return float(found[0]) if found else default

    residual = first("dropout_rate", "resid_pdrop", "dropout", "hidden_dropout")
    t5_style = hasattr(config, "dropout_rate")
    return dict(dropout=residual,
                attention_dropout=first("attention_dropout", "attn_pdrop", default=residual if t5_style else 0.0),
                activation_dropout=first("activation_dropout", default=residual if t5_style else 0.0))


def _norm_count(block) -> int:
    """Norm layers in a block (innermost modules whose class is a norm)."""
    norms = [m for m in block.modules() if "norm" in type(m).__name__.lower()]
    return sum(1 for m in norms if not any(c is not m and c in norms for c in m.modules()))


def _linear_shapes(module) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every linear layer under `module`, by name: nn.Linear and GPT-2's Conv1D
    (which stores its weight transposed; transformers quantizes both)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    found = {}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            found[name] = (m.in_features, m.out_features)
        elif isinstance(m, Conv1D):
            found[name] = (m.weight.shape[0], m.nf)
    return found


def _quantized_weights(model) -> dict[str, None]:
    """Names of the weights bitsandbytes will hold in 4-bit: transformers' own rule (skip the output head, tied
    weights and `_keep_in_fp32_modules`, e.g. T5's `wo`), applied to exact `nn.Linear` layers."""
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    from transformers.pytorch_utils import Conv1D

    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    return {f"{name}.weight": None for name, module in model.named_modules()
            if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip)}


def _first_blocks(model) -> dict[str, object]:
    """Block 0 of each stack (one for a decoder, encoder and decoder for T5), by name."""
    return {name: module for name, module in model.named_modules()
            if name.endswith(".0") and not any(part.isdigit() for part in name.split(".")[:-1])}


def _stream(name: str) -> str:
    """"cross" = the cross-attention k/v (T5's EncDecAttention, BART's encoder_attn), which run over the encoder's
    tokens; else the stack's own tokens."""
    if re.search(r"EncDecAttention\.(k|v)$|encoder_attn\.(k_proj|v_proj)$", name):
        return "cross"
    return "enc" if ".encoder." in f".{name}" else "dec"


def _reads_attention(name: str) -> bool:
    return re.search(r"(attn|attention)\.(o_proj|o|out_proj|dense|c_proj)$", name, re.IGNORECASE) is not None


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


def _uses_dora(module) -> bool:
    return bool(getattr(module, "use_dora", {}).get("default"))


def _block0(peft_model, kind: str) -> tuple[tuple[str, int], ...]:
    """Block 0's IA3 layers: (stream, width of the tensor its vector scales: the output, or the down projection's
    input); or its DoRA layers: (stream, out_features)."""
    found = []
    for name, module in peft_model.named_modules():
        first_index = re.search(r"\.(\d+)\.", name)
        if first_index is None or first_index.group(1) != "0":
            continue
        if kind == "ia3" and "default" in getattr(module, "ia3_l", {}):
            found.append((_stream(name), module.in_features if module.is_feedforward else module.out_features))
        elif kind == "dora" and _uses_dora(module):
            found.append((_stream(name), module.out_features))
    return tuple(found)


def _linear_inputs(blocks: dict) -> tuple[tuple[str, int, int, bool], ...]:
    """The distinct inputs of block 0's linear layers: layers of one parent reading the same width in the same
    stream share an input (q/k/v, gate/up), each saved once in fp32 and cast once per layer under autocast."""
    groups: dict[tuple, int] = {}
    for prefix, block in blocks.items():
        for name, (n_in, _) in _linear_shapes(block).items():
            full = f"{prefix}.{name}"
            key = (full.rsplit(".", 1)[0], _stream(full), n_in, _reads_attention(full))
            groups[key] = groups.get(key, 0) + 1
    return tuple((stream, n_in, count, reads) for (_, stream, n_in, reads), count in groups.items())


def _cast_params(module, trainable: dict, head) -> dict[int, int]:
    """Trainable fp32 weights and biases of the linear layers in `module` (id -> numel): what autocast casts."""
    layers = dict(module.named_modules())
    skip = {id(p) for p in head.parameters()} if head is not None else set()
    return {id(p): p.numel() for name in _linear_shapes(module) for p in layers[name].parameters(recurse=False)
            if id(p) in trainable and id(p) not in skip}


def _mlp_saved(blocks: dict, config, width: int) -> int:
    """Intermediate-width tensors the MLP saves: the activation's own (gelu_new: 4, silu/relu/gelu: 1) plus the
    two factors of the gate product when the MLP is gated (two projections to the width, or one fused to 2x)."""
    act = next((getattr(config, k) for k in ("dense_act_fn", "hidden_act", "activation_function")
                if isinstance(getattr(config, k, None), str)), "silu")
    outs = [out for _, out in _linear_shapes(next(iter(blocks.values()))).values()]
    gated = outs.count(width) >= 2 or 2 * width in outs
    return (4 if act == "gelu_new" else 1) + (2 if gated else 0)
