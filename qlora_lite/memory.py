"""Stage 0, preflight: predict the peak GPU memory of a recipe before any weight is loaded.

Inputs: a `Recipe` and the model's `PretrainedConfig` (`load_model_config` reads only config.json or GGUF metadata).
Output: a `MemoryPlan` (GiB, 2^30 bytes) for training and for evaluation (batched greedy generation), whichever
peaks higher, and `fit_to_budget`, the cheapest recipe change that fits the budget (never another method).

Parameter counts are exact (memory_arch.py builds the model on the meta device and attaches the method with PEFT
itself); `recipe_arch` caches that skeleton on disk, so a repeated plan imports none of torch, transformers or peft.
Bytes follow the tensors autograd saves in the stack model.py builds for each `[method] kind`, checked
tensor by tensor in tests/test_memory.py:
- qlora: NF4 linears, bf16 embeddings/lm_head, fp32 norms and LoRA, bf16 autocast. fp32 norm weights promote
  their outputs to fp32 and bitsandbytes answers in its input's dtype, so a 4-bit decoder's residual stream,
  gated-MLP intermediates and KV cache are fp32. lora: the same over 16-bit linears, which answer in bf16.
- prompt_tuning: a frozen base (4-bit or not) over sequences num_virtual_tokens longer (T5: the encoder's only),
  gradients flowing through every block to the soft prompt: LoRA's activations without LoRA's own tensors.
- ln_tuning, ia3: the same frozen base; trained norms also save their normalized input, each IA3 vector the tensor
  it scales. DoRA (lora.use_dora) adds its magnitudes' saved base outputs and, per layer and forward, the adapted
  weight rebuilt to take its norm (one layer at a time; not yet measured on a GPU).
- full: fp32 weights, gradients and optimizer state for every weight, bf16 autocast on CUDA (fp32 on a CPU, where
  the Trainer does not autocast). Each linear saves its input for its weight gradient, each norm its normalized
  input. Autocast caches the bf16 copy of every fp32 weight it casts until the forward's autocast region exits,
  under no_grad too (torch caches casts of leaves that require grad whatever the grad mode): so even with reentrant
  checkpointing the forward ends holding a bf16 copy of every linear weight (`autocast_copies`, 2 bytes/param).
Training peaks at the end of the forward, in the backward (of the loss head or of one block), or in the optimizer
step (`optimizer_step`: torch's foreach AdamW makes fp32 temporaries as large as the weights). Assumed: gradients
stay allocated from one micro-batch to the next (gradient accumulation); evaluation runs after the trainer's
gradients and optimizer state are freed. Measured on one GPU (tools/bench_memory.py --gpu: H200, torch 2.11 +
CUDA 13, Mistral-7B at 4 x 512 and 1 x 4096 tokens): the CUDA context with cuBLAS workspaces and loaded kernels,
0.87 GiB (planned 0.875; other GPUs and drivers differ by a few hundred MiB), and the allocator reserve (10% of
transient memory: the planned reserved peak +0.3% and +1.2% over torch's). Architectures: shapes, layer counts,
norms per block and dropout rates are read from the skeleton and the config, so any family transformers builds gets
a plan; CHECKED_FAMILIES are those checked against real steps, and the plan's `notes` say when a model is outside
them. Not modelled: MoE routing (noted), Gemma-style norms that cast back to bf16, packed batches. Planned for the
worst batch: padded (the float mask sdpa makes, k and v repeated to every head), which a batch of full rows skips.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path

from qlora_lite.errors import UserError
from qlora_lite.memory_arch import Arch, analyze
from qlora_lite.methods import METHODS
from qlora_lite.recipe import BudgetRecipe, Recipe
from qlora_lite.source import (
    cache_key, config_identity, file_sha256, library_versions, load_model_config, read_cached, write_cached,
)

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
CUDA_CONTEXT_GIB = 0.875  # context, cuBLAS workspaces, kernels: 0.87 GiB measured (H200, CUDA 13); varies by GPU
RESERVE_FRACTION = 0.10  # caching-allocator slack per byte of transient memory (heuristic, see _finish)
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768  # trl/kernels/chunked_logprob.py: its buffer, whatever the vocab
BNB_MIN_8BIT_NUMEL, BNB_PAGED_MIN_NUMEL = 4096, 100_000  # bitsandbytes/optim/optimizer.py
# Families whose byte model is checked against every allocation of real training steps on CPU (tests/test_memory.py):
# Llama and T5 tensor by tensor, the rest whole-step within 10%. Others are planned with the same rules.
CHECKED_FAMILIES = ("llama", "t5", "mt5", "mistral", "qwen2", "gemma2", "phi", "phi3", "gpt2", "gpt_neox", "opt",
                    "bloom", "falcon", "bart")
PLAN_KEYS = ("weights_4bit", "weights_16bit", "trainable_weights", "gradients", "optimizer", "optimizer_step",
             "autocast_copies", "activations", "logits", "kv_cache", "ddp_buckets", "fsdp_gathered", "cuda_context",
             "allocator_reserve")
PARALLEL_KEYS = ("ddp_buckets", "fsdp_gathered")  # in a plan only with several processes
TRANSIENT_KEYS = ("optimizer_step", "autocast_copies", "activations", "logits", "kv_cache")
HERE = Path(__file__).parent
# what analyze runs: a change re-analyzes
SKELETON_CODE = ("memory_arch.py", "model.py", "lora.py", "methods.py", "experts4bit.py")


@dataclass(frozen=True)
class MemoryPlan:
    components: dict[str, float]  # name -> GiB of the peak phase; sums to peak_gib
    peak_gib: float  # what nvidia-smi would show: allocated + allocator reserve + CUDA context (+ paged states)
    peak_allocated_gib: float  # what torch.cuda.max_memory_allocated would show
    train_peak_gib: float
    eval_peak_gib: float
    trainable_params: int
    total_params: int  # as model.count_parameters reports it (PEFT's count for adapters)
    budget_gib: float | None
    fits: bool | None
    phase: str  # "train" or "eval"
    notes: tuple[str, ...] = ()  # what the figures do not cover for this model
    world_size: int = 1  # processes (one per GPU); every figure is per GPU
    strategy: str = "ddp"  # with several: "ddp" (each GPU holds the whole model) or "fsdp" (sharded)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- budget


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


# ---------------------------------------------------------------- the skeleton, cached


def recipe_arch(recipe: Recipe) -> Arch:
    """`analyze` of the recipe's model and method, cached in cache_dir()/plan: building the skeleton needs torch,
    transformers and peft (seconds to import), and a GGUF config seconds more to parse; a cache hit needs none.
    The recipe's sequence lengths are checked against the model's positions here, where the skeleton is known."""
    key = arch_key(recipe)
    arch = _read_arch(key) if key is not None else None
    if arch is None:
        arch = analyze(recipe, load_model_config(recipe.model))
        key = key or arch_key(recipe)  # a hub model's config.json is in the hub cache now
        if key is not None:
            write_cached("plan", key, arch.to_json())
    check_context(recipe, arch)
    return arch


def _read_arch(key: str) -> Arch | None:
    """The cached Arch; None when missing, unreadable or corrupt (it is computed and written again)."""
    try:
        return Arch.from_json(read_cached("plan", key))
    except (TypeError, KeyError, AttributeError):
        return None


def check_context(recipe: Recipe, arch: Arch) -> None:
    """Refuse sequences longer than the model's positions cover: learned positions (GPT-2, OPT, BART) fail with
    an index error mid-training, rotary ones (Llama) train on positions the model never saw."""
    if arch.max_positions is None:
        return
    t = recipe.train
    keys = ["max_source_length", "max_target_length"] if arch.is_encoder_decoder else ["max_length"]
    for key in keys:  # prompt tuning prepends its virtual tokens to the (encoder's) input
        extra = arch.virtual_tokens if key != "max_target_length" else 0
        longest = getattr(t, key) + extra
        if longest > arch.max_positions:
            what = f"train.{key}" + (f" + method.num_virtual_tokens = {longest}" if extra else f" = {longest}")
            raise UserError(f"{what} is longer than the model's context: its config sets {arch.max_positions_key} "
                            f"= {arch.max_positions}; set train.{key} to {arch.max_positions - extra} or less "
                            f"(--set train.{key}=N)")
    if arch.is_encoder_decoder and recipe.eval.enabled and recipe.eval.max_new_tokens >= arch.max_positions:
        raise UserError(f"eval.max_new_tokens = {recipe.eval.max_new_tokens}: the decoder's positions end at "
                        f"{arch.max_positions_key} = {arch.max_positions} (the start token takes one); set "
                        f"eval.max_new_tokens to {arch.max_positions - 1} or less")


def arch_key(recipe: Recipe) -> str | None:
    """A sha256 of everything `analyze`'s result depends on, read without importing torch: the model's config, the
    recipe sections analyze reads, the library versions and the source of the code that builds the skeleton. None where it cannot be known
    cheaply (a config not on disk) or safely (remote code changes without its config.json changing)."""
    identity = None if recipe.model.trust_remote_code else config_identity(recipe.model)
    if identity is None:
        return None
    sections = [dataclasses.asdict(s) for s in (recipe.model, recipe.quantization, recipe.lora, recipe.method)]
    versions = library_versions()
    code = [file_sha256(HERE / name) for name in SKELETON_CODE]
    parts = [identity, sections, recipe.load_in_4bit, recipe.has_adapter, versions, code]
    return cache_key(parts)


# ---------------------------------------------------------------- byte model


def trains_all(arch: Arch) -> bool:
    """Full fine-tuning's stack: fp32 weights that all train, their gradients and optimizer state."""
    return not METHODS[arch.method].has_adapter


@dataclass(frozen=True)
class Precision:
    """Bytes per element where the stack's dtypes differ (see the module docstring)."""

    compute: int  # autocast dtype: bf16/fp16 = 2, fp32 = 4
    linear_out: int  # a base linear layer's output for an fp32 input: 4 for 4-bit layers
    stream: int  # the residual stream between blocks, what gradient checkpointing keeps
    mask: int  # a dropout mask: bool on CUDA's fused kernel, input-dtype noise on CPU


def precision(recipe: Recipe, arch: Arch, device: str) -> Precision:
    dtype, full = recipe.quantization.compute_dtype, trains_all(arch)
    if device != "cuda" and (dtype == "auto" or full):  # no autocast off CUDA: full fine-tuning computes in fp32
        c = 4
    elif dtype == "auto":  # model.py: bf16 where the GPU has it, else fp16, and fp32 for T5 (overflows in fp16)
        fp16_only = (recipe.budget.gpu or "").strip().lower() in FP16_ONLY_CARDS
        c = 4 if fp16_only and arch.is_encoder_decoder else 2
    else:
        c = 4 if dtype == "fp32" else 2
    linear_out = 4 if recipe.load_in_4bit or c == 4 else c
    # fp32 embeddings start full fine-tuning's stream in fp32; T5 casts to `wo`'s dtype before its last linear
    stream = 4 if full else c if arch.is_encoder_decoder else linear_out
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


def weight_bytes(recipe: Recipe, arch: Arch, p: Precision, device: str, phase: str = "train") -> dict[str, float]:
    """Resident weights. A frozen base: NF4 layers with their constants, fp32 norms, the rest in the compute dtype,
    plus the fp32 trainable tensors. Full fine-tuning: fp32 weights, and in evaluation the base reloaded in the
    compute dtype for the base-vs-tuned comparison."""
    if trains_all(arch):
        return {"trainable_weights": 4 * arch.params.base,
                "weights_16bit": p.compute * arch.params.base if phase == "eval" else 0}
    q = recipe.quantization
    return {"weights_4bit": sum(_nf4_bytes(n, q.double_quant, device) for n in arch.quantized_numels),
            "weights_16bit": 4 * arch.norm_params + p.compute * arch.other_params,
            "trainable_weights": 4 * arch.params.trainable}


def optimizer_bytes(recipe: Recipe, arch: Arch, device: str) -> tuple[int, int]:
    """(ordinary, paged) bytes of optimizer state. bitsandbytes keeps 32-bit state for tensors under 4096
    elements, and for nn.Embedding weights (the Trainer registers that override), and pages only tensors of 1e5
    elements or more; Adafactor factors 2-D second moments."""
    name = recipe.train.optimizer_on(device)
    ordinary = paged = 0
    for i, shape in enumerate(arch.trainable_shapes):
        n = math.prod(shape)
        if name == "adafactor":  # transformers' Adafactor as the Trainer builds it: no first moment
            ordinary += 4 * (shape[-1] + math.prod(shape[:-1]) if len(shape) >= 2 else n)
            continue
        if name == "adamw_torch":
            ordinary += 8 * n
            continue
        eight_bit = "8bit" in name and n >= BNB_MIN_8BIT_NUMEL and i not in arch.embedding_indices
        states = (2 if eight_bit else 8) * n
        ordinary += 8 * math.ceil(n / 256) if eight_bit else 0  # two fp32 absmax per 256-block
        if name.startswith("paged") and device == "cuda" and n >= BNB_PAGED_MIN_NUMEL:
            paged += states
        else:
            ordinary += states
    return ordinary, paged


def step_bytes(recipe: Recipe, arch: Arch, device: str) -> int:
    """Temporaries of one optimizer step over the Trainer's parameter groups (tensors of 2 or more dimensions
    decay, the rest not). torch's AdamW runs foreach kernels on CUDA: its denominator is one fp32 tensor list as
    large as a group. On a CPU, and in transformers' Adafactor everywhere, the update goes tensor by tensor: two
    fp32 temporaries of a tensor beside the last one of the tensor before (Adafactor's runs across groups).
    bitsandbytes updates in place."""
    name = recipe.train.optimizer_on(device)
    groups = [[math.prod(s) for s in arch.trainable_shapes if (len(s) >= 2) == decay] for decay in (True, False)]
    if name == "adamw_torch" and device == "cuda":
        return 4 * max(sum(group) for group in groups)
    if name not in ("adamw_torch", "adafactor"):
        return 0
    runs = groups if name == "adamw_torch" else [groups[0] + groups[1]]
    return max((4 * (run[i - 1] if i else 0) + 8 * n for run in runs for i, n in enumerate(run)), default=0)


def _fused(arch: Arch, device: str) -> bool:
    """sdpa runs a fused kernel: always on CUDA; on CPU only without attention dropout."""
    return arch.attention == "sdpa" and (device == "cuda" or not arch.attention_dropout)


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


def _linear_input_bytes(arch: Arch, p: Precision, stream: str, device: str) -> int:
    """Per token, full fine-tuning: every linear layer saves its input for its weight gradient. In fp32 the layers
    reading one tensor (q/k/v, gate/up, and all of T5's cross-attention k/v, counted in train_transient) share it;
    under autocast each casts its own copy. The output projection reads the fused kernel's saved output."""
    total = 0
    for where, n_in, readers, reads_attention in arch.linear_inputs:
        if where != stream or (reads_attention and _fused(arch, device)) or (where == "cross" and p.compute == 4):
            continue
        total += p.compute * n_in * (readers if p.compute < 4 else 1)
    return total


def _trained_bytes(arch: Arch, p: Precision, recipe: Recipe, stream: str, device: str) -> int:
    """Per token, what the method's own trainable layers save (prompt tuning adds none inside the blocks; IA3's
    vectors keep the tensor they scale)."""
    if trains_all(arch):
        return _linear_input_bytes(arch, p, stream, device)
    scaled = sum(p.linear_out * width for where, width in arch.ia3_scaled if where == stream)
    # DoRA keeps the base output and LoRA's output, each scaled by magnitude / weight norm
    dora = sum((p.linear_out + p.compute) * width for where, width in arch.dora_outputs if where == stream)
    return _lora_bytes(arch, p, recipe, stream, device) + scaled + dora


def trains_norms(arch: Arch) -> bool:
    """Norm weights train (full fine-tuning, LN tuning): each norm also saves its normalized input."""
    return trains_all(arch) or METHODS[arch.method].trains == "norm layers"


def _dora_bytes(arch: Arch, p: Precision) -> int:
    """DoRA rebuilds each adapted weight to take its norm: the base weight dequantized (compute dtype), B @ A and
    their sum (fp32), for one layer at a time, in every forward (on a CPU too)."""
    return (p.compute + 8) * arch.dora_weight


def _attention_bytes(arch: Arch, p: Precision, s_kv: int, kv_ratio: float, device: str) -> float:
    """Per query token. Fused kernels (CUDA sdpa) keep q, k, v (repeated to all heads, as padded batches use
    repeat_kv), the output, an fp32 logsumexp and the float mask sdpa makes of the padding mask in every layer
    (T5: its position bias, per head). The math path keeps the fp32 softmax (its compute-dtype copy, or the
    dropout mask and output) over s_kv keys."""
    c, heads, inner = p.compute, arch.heads, arch.heads * arch.head_dim
    if _fused(arch, device):
        bias = c * s_kv * (heads if arch.relative_bias else 1)
        return c * inner * (2 + 2 * kv_ratio) + 4 * heads + bias
    probs = 4 + (p.mask + c if arch.attention_dropout else (c if c < 4 else 0))
    return c * inner * (1 + 2 * kv_ratio) + probs * heads * s_kv


def layer_bytes(arch: Arch, p: Precision, recipe: Recipe, device: str, s: int, s_enc: int = 0, stream="dec"):
    """Bytes per token autograd saves in one block: norms (fp32 input + rsqrt, and the normalized input when the
    norm weight trains) as many as the block has, attention, MLP, the trained layers' inputs, dropout masks."""
    h, f = arch.hidden, arch.intermediate
    drop, act_drop = (p.mask if rate else 0 for rate in (arch.dropout, arch.activation_dropout))
    norm = 4 * h + 4 + (p.stream * h if p.stream < 4 and arch.relative_bias else 0)  # T5 keeps both
    norm += 4 * h if trains_norms(arch) else 0
    total = dict(arch.block_norms)[stream] * norm + _attention_bytes(arch, p, s, 1.0, device)
    total += _mlp_bytes(arch, p) + _trained_bytes(arch, p, recipe, stream, device)
    total += drop * 2 * h + act_drop * f
    if stream == "dec" and arch.is_encoder_decoder:  # cross-attention: attention, k/v inputs, dropout
        total += _attention_bytes(arch, p, s_enc, s_enc / s, device) + drop * h
        total += _trained_bytes(arch, p, recipe, "cross", device) * s_enc / s
    return total


def _mlp_bytes(arch: Arch, p: Precision) -> float:
    """Per token, what the MLP saves for backward. 4-bit experts (experts4bit's loop, in the compute dtype), for each
    of the top-k experts a token runs: the gate/up output with its LoRA (2f), the activation and the gated product
    (f each), the input and the down output (h each); checked against tools/sim_cuda.py's Mixtral rows."""
    top_k, f = arch.expert_mlp
    if top_k:
        return top_k * p.compute * (4 * f + 2 * arch.hidden)
    return arch.mlp_saved * p.linear_out * arch.intermediate


def sequence_lengths(arch: Arch, recipe: Recipe) -> tuple[int, int]:
    """(decoder, encoder) tokens of a training sequence inside the model: prompt tuning prepends its virtual tokens
    to a decoder-only sequence, or to T5's encoder input (PEFT leaves the decoder as is)."""
    t, v = recipe.train, arch.virtual_tokens
    if arch.is_encoder_decoder:
        return t.max_target_length, t.max_source_length + v
    return t.max_length + v, 0


def train_transient(arch: Arch, p: Precision, recipe: Recipe, device: str) -> dict[str, float]:
    """What training holds beyond resident tensors, at the largest of its moments: the end of the forward (saved
    tensors, the loss head, autocast's cache of cast weights), the loss head's backward (with a trained head, its
    weight's fp32 gradient before it joins .grad), and the backward of one block (its recomputed activations, the
    gradients flowing in and out and through its MLP intermediates, a dequantized weight, a weight gradient before
    it joins .grad, the block's cast weights). With checkpointing a block saves only its input, and autocast's cache
    is freed when the forward ends; without, every cast weight stays saved until its block's backward."""
    b, checkpointing = recipe.train.micro_batch_size, recipe.train.gradient_checkpointing
    s_dec, s_enc = sequence_lengths(arch, recipe)
    h, f, c, full = arch.hidden, arch.intermediate, p.compute, trains_all(arch)
    stacks = [("dec", arch.decoder_layers if arch.is_encoder_decoder else arch.layers, s_dec)]
    if arch.is_encoder_decoder:
        stacks.append(("enc", arch.layers, s_enc))
    saved = block = 0.0
    for stream, layers, s in stacks:
        per_token = layer_bytes(arch, p, recipe, device, s, s_enc, stream)
        saved += b * s * (layers * p.stream * h if checkpointing else layers * per_token)
        final_norm = 4 * h + 4 + (4 * h if trains_norms(arch) else 0) + (2 * p.mask * h if arch.dropout else 0)
        saved += b * s * final_norm
        recomputed = per_token if checkpointing else 0
        mlp_width = arch.expert_mlp[0] * arch.expert_mlp[1] or f  # 4-bit experts: the top-k experts' widths
        block = max(block, b * s * (recomputed + 8 * h + 2 * p.linear_out * mlp_width))
    block += _dequantized(arch, p, device) + (4 + (c if c < 4 else 0)) * arch.largest_linear + _dora_bytes(arch, p)
    if full and arch.is_encoder_decoder:  # the LM head's input; in fp32 the encoder output every cross-attention reads
        saved += b * s_dec * c * h + (b * s_enc * 4 * h if c == 4 else 0)
    scores = s_enc * s_enc + s_dec * s_dec + s_dec * s_enc  # self-attention of each stack, cross-attention
    if arch.relative_bias:  # T5's position biases of both stacks, shared by their blocks and the batch
        saved += arch.heads * c * scores
    else:  # the padding masks, shared by all blocks
        saved += b * scores * (1 if arch.attention == "sdpa" else c)
    head = loss_head_bytes(arch, p, recipe, device)
    cache, one_block = (c * arch.cast_params, c * arch.block_cast_params) if c < 4 else (0, 0)
    if checkpointing:
        forward_end = (saved, loss_head_bytes(arch, p, recipe, device, forward=True), cache)
        moments = [forward_end, (saved, head, 0), (saved + block, 0, one_block)]
    else:
        moments = [(saved, head, cache), (saved + block, 0, cache)]
    activations, logits, copies = max(moments, key=sum)
    return {"activations": activations, "logits": logits, "autocast_copies": copies}


def loss_head_bytes(arch: Arch, p: Precision, recipe: Recipe, device: str = "cuda", forward: bool = False) -> float:
    """The loss head in its backward (or forward). Seq2SeqTrainer: full logits (fp32 log-softmax, its gradient and
    the input's gradient, 12 bytes each). TRL: the fp32 hidden of scored positions (and its gradient), and one
    4096 x 32768 tile, whatever the vocab; on CUDA it scores labelled positions only (never virtual tokens),
    elsewhere every position, and without Triton its fold makes fp32 temporaries of each vocabulary chunk (about 4
    forward, 8 backward). A trained head (full fine-tuning) is cast to the compute dtype a chunk at a time, and its
    weight's fp32 gradient is whole before it joins .grad."""
    t, b, trained = recipe.train, recipe.train.micro_batch_size, trains_all(arch)
    weight_grad = 4 * arch.vocab * arch.hidden if trained and not forward else 0
    if arch.is_encoder_decoder:
        return 12 * b * t.max_target_length * arch.vocab + weight_grad
    n = b * (t.max_length - 1 + (0 if device == "cuda" else arch.virtual_tokens))
    rows, chunk = min(n, TRL_TOKEN_TILE), min(arch.vocab, TRL_VOCAB_TILE)
    fold = 0 if device == "cuda" else (4 if forward else 8) * 4 * rows * chunk
    cast = p.compute * chunk * arch.hidden if trained and p.compute < 4 else 0
    hidden = (4 if forward else 8) * n * arch.hidden
    return hidden + rows * (TRL_VOCAB_TILE + arch.hidden) * p.compute + fold + cast + weight_grad


def eval_transient(arch: Arch, p: Precision, recipe: Recipe, device: str = "cuda") -> dict[str, float]:
    """Batched greedy generation. Decoder-only: the prefill's peak, in a block's MLP over the whole prompt (four
    intermediates, four fp32 hidden-size tensors), beside the KV cache of prompt + new tokens (fp32 for 4-bit
    layers: k_proj answers in its fp32 input's dtype). T5: the larger of the encoder's MLP moment (three
    intermediates, eight hidden-size tensors, the position bias) and decoding (both caches, encoder output).
    Prompts are num_virtual_tokens longer with prompt tuning; autocast caches an adapter's cast weights for the
    whole generate() (full fine-tuning's base-vs-tuned comparison holds the larger reloaded base instead)."""
    b, t, new = recipe.eval.batch_size, recipe.train, recipe.eval.max_new_tokens
    h, f, kv_width = arch.hidden, arch.intermediate, arch.kv_heads * arch.head_dim
    prompt = (t.max_source_length if arch.is_encoder_decoder else t.max_length) + arch.virtual_tokens
    wide, narrow = (3, 8) if arch.is_encoder_decoder else (4, 4)
    prefill = b * prompt * (4 * narrow * h + wide * p.linear_out * f) + _dequantized(arch, p, device)
    prefill += _dora_bytes(arch, p)
    logits = b * arch.vocab * (p.compute + 8)  # the last position only, upcast to fp32 for the argmax
    layers = arch.decoder_layers if arch.is_encoder_decoder else arch.layers
    kv = layers * 2 * b * kv_width * (prompt + new) * p.linear_out
    copies = p.compute * arch.cast_params if p.compute < 4 and not trains_all(arch) else 0
    if not arch.is_encoder_decoder:
        return {"kv_cache": kv, "activations": prefill + logits, "autocast_copies": copies}
    prefill += prompt * prompt * (arch.heads * p.linear_out if arch.relative_bias else b)
    decoding = kv + b * prompt * 4 * h + logits
    if prefill > decoding:
        return {"kv_cache": 0.0, "activations": prefill, "autocast_copies": copies}
    return {"kv_cache": kv, "activations": decoding - kv, "autocast_copies": copies}


def _dequantized(arch: Arch, p: Precision, device: str) -> int:
    """On CUDA a 4-bit matmul over many tokens dequantizes the weight first; the CPU kernel works in place."""
    return p.compute * max(arch.quantized_numels, default=0) if device == "cuda" else 0


# ---------------------------------------------------------------- the plan


def plan_memory(recipe: Recipe, config, *, device: str = "cuda") -> MemoryPlan:
    """Peak memory of training and of evaluation for this recipe; `fits` against the recipe's budget."""
    return plan_from_arch(recipe, analyze(recipe, config), device)


def plan_from_arch(recipe: Recipe, arch: Arch, device: str = "cuda", *, world: int = 1) -> MemoryPlan:
    """Per GPU: with `world` > 1 each DDP process holds one whole run plus DDP's gradient buckets; under FSDP
    (train.strategy) each holds 1/world of the model's state plus the layers gathered whole for compute."""
    (train, train_alloc), (evals, eval_alloc) = phases(recipe, arch, device, world)
    train_peak, eval_peak = sum(train.values()), sum(evals.values())
    phase = "train" if train_peak >= eval_peak else "eval"
    budget = budget_gib(recipe.budget)
    peak = max(train_peak, eval_peak)
    return MemoryPlan(
        components=train if phase == "train" else evals, peak_gib=peak,
        peak_allocated_gib=train_alloc if phase == "train" else eval_alloc, train_peak_gib=train_peak,
        eval_peak_gib=eval_peak, trainable_params=arch.params.trainable, total_params=arch.params.total,
        budget_gib=budget, fits=None if budget is None else peak <= budget, phase=phase,
        notes=plan_notes(arch) + parallel_notes(recipe, world), world_size=world, strategy=recipe.train.strategy)


def parallel_notes(recipe: Recipe, world: int) -> tuple[str, ...]:
    if world == 1:
        return ()
    nccl = "NCCL's own buffers (typically 0.1-0.5 GiB per GPU) are not planned: not measured here yet"
    if recipe.train.strategy == "ddp":
        return (f"DDP: each GPU holds the whole model and a copy of every trainable gradient in DDP's buckets; "
                f"{nccl}",)
    return (f"FSDP ({world} GPUs): weights, gradients and optimizer state split {world} ways; the 4-bit weights' "
            f"quantization constants stay whole on every GPU (they are not parameters); two layers and the "
            f"embeddings gathered whole at a time (one computing, one prefetched); {nccl}; host RAM while loading "
            f"(the checkpoint read once per machine) is not planned",)


def plan_notes(arch: Arch) -> tuple[str, ...]:
    """Where the plan is an extrapolation: a family it was never checked on, a mixture of experts."""
    notes = []
    if arch.model_type not in CHECKED_FAMILIES:
        notes.append(f"{arch.model_type} is not among the families the planner was checked on: its activation "
                     f"figures are an estimate")
    if arch.expert_mlp[0]:
        notes.append(f"mixture of experts ({arch.experts} experts, {arch.expert_mlp[0]} per token): activations "
                     f"are planned for each token's experts, which a batch routed very unevenly can exceed")
    elif arch.experts:
        notes.append(f"mixture of experts ({arch.experts} experts): routing is not modelled; activations are "
                     f"planned as if every token ran one dense MLP")
    fused = arch.fused_expert_params + arch.experts_4bit  # 16-bit or 4-bit (experts4bit)
    if fused and METHODS[arch.method].uses_lora and not arch.fused_experts_adapted:
        notes.append(f"PEFT puts no LoRA on its fused experts ({fused / 1e6:.1f}M weights): they stay frozen, only "
                     f"its linear layers train")
    if arch.experts_4bit:
        layer = 2 * 3 * arch.experts * arch.expert_mlp[1] * arch.hidden  # gate_up (2f x h) + down (h x f), 16-bit
        notes.append(f"its experts are quantized as they load (experts4bit): one layer's in 16-bit, "
                     f"{layer / GIB:.2f} GiB, is on the device at a time while the model loads (not all "
                     f"{2 * arch.experts_4bit / GIB:.1f} GiB of them); that load peak is not in the figures above")
    if arch.fused_expert_params and arch.quantized_numels:
        notes.append(f"its experts are fused 3-D tensors, which bitsandbytes does not quantize: "
                     f"{2 * arch.fused_expert_params / GIB:.2f} GiB of them stay in 16-bit (in weights_16bit)")
    return tuple(notes)


def phases(recipe: Recipe, arch: Arch, device: str = "cuda", world: int = 1) -> tuple[tuple[dict, float],
                                                                                          tuple[dict, float]]:
    """(components in GiB, allocator peak in GiB) of training and of evaluation (zeros when eval is off). Training
    peaks in the forward/backward or in the optimizer step, whichever holds more. DDP (`world` > 1) adds its
    gradient buckets: the Reducer allocates them all at wrap time, one fp32 copy of each trainable gradient
    (gradient_as_bucket_view is off in the Trainer); evaluation runs on rank 0 alone, after the wrapper is gone."""
    p = precision(recipe, arch, device)
    ordinary, paged = optimizer_bytes(recipe, arch, device)
    ddp = world > 1 and recipe.train.strategy == "ddp"
    shards = world if recipe.train.strategy == "fsdp" else 1
    train = {**weight_bytes(recipe, arch, p, device), "gradients": 4 * arch.params.trainable,
             "optimizer": ordinary + paged, "ddp_buckets": 4 * arch.params.trainable if ddp else 0}
    train = sharded(train, recipe, arch, p, shards)
    transient, step = train_transient(arch, p, recipe, device), step_bytes(recipe, arch, device)
    train.update(transient if sum(transient.values()) >= step else {"optimizer_step": step / shards})
    if not recipe.eval.enabled:
        return _finish(train, device, paged / shards), (dict.fromkeys(PLAN_KEYS, 0.0), 0.0)
    evals = {**sharded(weight_bytes(recipe, arch, p, device, "eval"), recipe, arch, p, shards),
             **eval_transient(arch, p, recipe, device)}
    return _finish(train, device, paged / shards), _finish(evals, device, 0)


def sharded(parts: dict[str, float], recipe: Recipe, arch: Arch, p: Precision, shards: int) -> dict[str, float]:
    """FSDP2 over `shards` GPUs: each holds 1/shards of every parameter, gradient and optimizer state, except the
    4-bit weights' quantization constants (bitsandbytes keeps them beside the parameter, whole); while a layer
    computes, its parameters are gathered whole, the next layer's prefetched, and the root module's (embeddings,
    lm_head, final norm) stay gathered through forward and backward."""
    if shards == 1:
        return parts
    packed = sum(math.ceil(n / 2) for n in arch.quantized_numels) if "weights_4bit" in parts else 0
    out = {k: v / shards for k, v in parts.items()}
    out["weights_4bit"] = packed / shards + parts.get("weights_4bit", 0) - packed
    blocks = arch.layers + (arch.decoder_layers if arch.is_encoder_decoder else 0)
    per_block = (packed + 4 * arch.norm_params + 4 * arch.params.trainable) / blocks
    out["fsdp_gathered"] = 2 * per_block + p.compute * arch.other_params
    return out


def _finish(parts: dict[str, float], device: str, paged: int) -> tuple[dict[str, float], float]:
    """GiB per component, plus CUDA context and allocator reserve; and the allocator's own peak, which leaves out
    both and the paged optimizer state (bitsandbytes allocates that as CUDA managed memory)."""
    transient = sum(parts.get(k, 0) for k in TRANSIENT_KEYS)
    on_cuda = device == "cuda"
    parts = {**parts, "cuda_context": CUDA_CONTEXT_GIB * GIB if on_cuda else 0.0,
             "allocator_reserve": RESERVE_FRACTION * transient if on_cuda else 0.0}
    gib = {k: parts.get(k, 0) / GIB for k in PLAN_KEYS if k not in PARALLEL_KEYS or parts.get(k)}
    allocated = sum(gib.values()) - gib["cuda_context"] - gib["allocator_reserve"] - paged / GIB
    return gib, allocated


def fit_to_budget(recipe: Recipe, arch: Arch, *, device: str = "cuda", world: int = 1) -> tuple[Recipe, str] | None:
    """The cheapest change that fits the budget: a smaller micro-batch with more accumulation (same effective
    batch), then gradient checkpointing, then a smaller eval batch. Returns the recipe and what changed (the
    recipe as is when it fits or no budget is set), or None when nothing fits. `arch` is the recipe's (from
    recipe_arch or analyze): the changes leave the model and method, so the skeleton, as they are."""
    budget = budget_gib(recipe.budget)
    plan = plan_from_arch(recipe, arch, device, world=world)
    if budget is None or plan.fits:
        return recipe, "no memory budget set" if budget is None else f"fits as is ({plan.peak_gib:.1f} GiB)"
    fitted = _fit_training(recipe, arch, device, budget, world)
    fitted = fitted and _fit_eval(fitted, arch, device, budget)
    return (fitted, _describe_fit(recipe, fitted)) if fitted else None


def _fit_training(recipe: Recipe, arch: Arch, device: str, budget: float, world: int) -> Recipe | None:
    t = recipe.train
    sizes = [d for d in range(t.micro_batch_size, 0, -1) if t.micro_batch_size % d == 0]  # exact accumulation
    settings = [(t.gradient_checkpointing, mb) for mb in sizes]
    settings += [] if t.gradient_checkpointing else [(True, mb) for mb in sizes]
    for checkpointing, mb in settings:
        steps = t.gradient_accumulation_steps * t.micro_batch_size // mb
        train = dataclasses.replace(t, gradient_checkpointing=checkpointing, micro_batch_size=mb,
                                    gradient_accumulation_steps=steps)
        candidate = dataclasses.replace(recipe, train=train)
        if plan_from_arch(candidate, arch, device, world=world).train_peak_gib <= budget:
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
