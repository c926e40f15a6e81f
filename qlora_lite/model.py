"""Stage 3: load the base model (4-bit NF4 by default), its tokenizer, and make what the method trains trainable.

Inputs: the model, quantization, train and method sub-recipes. Output: a `LoadedModel` ready for a trainer.
What stays in which dtype is decided here, and the memory planner models exactly this:
- qlora: 4-bit linear layers, embeddings and lm_head in the compute dtype, norms in fp32, LoRA weights in fp32;
- lora: the same with 16-bit linear layers (the compute dtype);
- prompt_tuning: a frozen base (4-bit per [quantization]) and `num_virtual_tokens` trainable embeddings in fp32;
- ln_tuning, ia3: a frozen base (4-bit per [quantization]) with trainable fp32 copies of its norm layers, or fp32
  IA3 vectors on its key, value and down projections;
- full: every weight trainable, held in fp32 (master weights) and computed in the compute dtype under autocast.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_lite import dist
from qlora_lite.errors import UserError
from qlora_lite.experts4bit import quantize_experts, quantized_as_loaded
from qlora_lite.lora import wrap_lora
from qlora_lite.recipe import (
    LoraRecipe, MethodRecipe, ModelRecipe, PromptRecipe, QuantizationRecipe, Recipe, TrainRecipe, placeholders,
)
from qlora_lite.source import read_config, resolve_model_source

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    is_encoder_decoder: bool
    device: str
    compute_dtype: torch.dtype
    source: str | None  # the folder or hub id the weights came from (after GGUF conversion); None: the planner's
    # skeleton, built from a config alone


def pick_device(train: TrainRecipe) -> str:
    if train.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = \"cuda\" but no CUDA GPU is visible; use device = \"auto\" or \"cpu\"")
    if train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return train.device


def pick_compute_dtype(quant: QuantizationRecipe, device: str, is_encoder_decoder: bool = False) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU (bf16 matmuls there are ~15x slower).

    T5-family models overflow in fp16, so an encoder-decoder on an fp16-only GPU computes in fp32.
    """
    if quant.compute_dtype != "auto":
        return DTYPES[quant.compute_dtype]
    if device == "cpu":
        return torch.float32
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32 if is_encoder_decoder else torch.float16


def autocast(device: str, dtype: torch.dtype):
    """Mixed precision as the Trainer runs it. Needed outside training too: fp32 norms feed bf16/fp16 layers."""
    if device == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def load_model(model: ModelRecipe, quant: QuantizationRecipe, train: TrainRecipe,
               method: MethodRecipe = MethodRecipe(), prompt: PromptRecipe | None = None, *,
               base_only: bool = False, conversations: bool = False) -> LoadedModel:
    """Load tokenizer and base model, quantized as the method asks, on the device the recipe asks for.

    The tokenizer loads first and is checked against `prompt` (when given), so a model folder without tokenizer
    files or a chat template fails in seconds, before the weights. A method that trains every weight loads fp32
    weights: the optimizer updates fp32 master weights, autocast computes in the compute dtype (a pure bf16 model
    would round small updates away). `base_only`: the untrained base in the compute dtype, unquantized (what full
    fine-tuning is compared against).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, BitsAndBytesConfig

    device = pick_device(train)
    source = resolve_model_source(model)
    config = read_config(model, source)
    is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    dtype = pick_compute_dtype(quant, device, is_encoder_decoder)
    weights = dtype if method.spec.has_adapter or base_only else torch.float32  # fp32 master weights
    kwargs = {"dtype": weights, "trust_remote_code": model.trust_remote_code}
    if method.spec.quantizes(quant.load_in_4bit) and not base_only:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if quant.quant_storage == "compute_dtype" or (
                quant.quant_storage == "auto" and train.strategy == "fsdp") else torch.uint8,
        )
    kwargs["device_map"] = {"": dist.local_rank()} if device == "cuda" else "cpu"  # DDP: each rank its own GPU
    # transformers >= 5.2x swaps layers for kernels downloaded from the Hub by default (and fails without the
    # `kernels` package): the eager layers are what the plan counts, what CPU runs compute, and need no network
    kwargs["use_kernels"] = False
    tokenizer = load_tokenizer(source, model.trust_remote_code, name=f"model.name = {model.name!r}")
    if conversations and not tokenizer.chat_template:
        raise UserError(f'data.format = "messages": conversations are rendered with the tokenizer\'s chat template, '
                        f'and the tokenizer of {model.name} has none; use a chat model, or rows of prompt and '
                        f'completion text (format = "prompt_completion")')
    if prompt is not None and prompt.chat_template and not tokenizer.chat_template:
        raise UserError(f"prompt.chat_template = true, but the tokenizer of {model.name} has no chat template; "
                        f"set prompt.chat_template = false (prompt.template is then the whole prompt)")
    auto = AutoModelForSeq2SeqLM if is_encoder_decoder else AutoModelForCausalLM
    four_bit = "quantization_config" in kwargs
    try:  # 4-bit: fused MoE experts quantized as they load (one layer's 16-bit experts on the device at a time)
        with quantized_as_loaded(quant.quant_type, quant.double_quant, dtype) if four_bit else contextlib.nullcontext():
            base = auto.from_pretrained(source, **kwargs)
    except OSError as e:  # a folder with config.json but no (or a partial) set of weight files
        raise UserError(f"model.name = {model.name!r}: cannot load its weights ({str(e).splitlines()[0]})") from None
    if four_bit:  # fused MoE experts, which bitsandbytes leaves 16-bit: 4-bit too (checks, and any not yet done)
        quantize_experts(base, quant.quant_type, quant.double_quant, dtype)
    return LoadedModel(base, tokenizer, is_encoder_decoder, device, dtype, source)


def load_tokenizer(source: str, trust_remote_code: bool = False, name: str | None = None):
    """The tokenizer of a model folder, hub id or run directory; `name` is what the error calls it."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # no tokenizer files; or only a slow one that needs sentencepiece
        files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json")
        if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in files):
            why = f"none of {', '.join(files)} is in {source}; copy them from where the model came from"
        else:
            why = " ".join(str(e).split())[:300]
        raise UserError(f"{name or source}: cannot load its tokenizer ({why})") from None
    if tokenizer.pad_token is None:
        # Safe because labels are masked by position (collator pads labels with -100), never by token id.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attach_method(loaded: LoadedModel, recipe: Recipe):
    """Make trainable what the recipe's method trains (methods.METHODS); returns the model to hand to the trainer.

    The planner runs this same function on its meta-device skeleton (source None: a soft prompt starts from random
    vectors there, of the same shape), so the parameters it counts are the ones training builds.
    """
    trains = recipe.method.spec.trains
    if trains == "every weight":
        return unfreeze_all(loaded, recipe.train)
    if trains == "soft prompt":
        return attach_prompt_tuning(loaded, recipe.method, recipe.prompt, recipe.train)
    if trains == "norm layers":
        return attach_ln_tuning(loaded, recipe.train)
    if trains == "ia3 vectors":
        return attach_ia3(loaded, recipe.train)
    return attach_lora(loaded, recipe.lora, recipe.train)


def freeze_base(model, train: TrainRecipe, *, use_reentrant: bool = True) -> None:
    """Freeze every weight, upcast only the norms, enable gradient checkpointing, turn the KV cache off.

    PEFT's `prepare_model_for_kbit_training` upcasts embeddings and lm_head to fp32 too, which at large
    vocabularies costs gigabytes for nothing (bitsandbytes#1569); here they stay in the compute dtype.
    """
    for name, param in model.named_parameters():
        param.requires_grad = False
        if param.ndim == 1 and param.dtype in (torch.float16, torch.bfloat16) and "norm" in name.lower():
            param.data = param.data.float()
    if train.gradient_checkpointing:
        enable_checkpointing(model, use_reentrant)
        if use_reentrant:
            model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
    model.config.use_cache = False


def enable_checkpointing(model, use_reentrant: bool) -> None:
    """Recompute each block's activations in the backward pass. transformers 5.2x renamed
    gradient_checkpointing_enable to activation_checkpointing_enable (the old name warns, and goes in 6); the
    oldest transformers the pins allow has only the old name."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def attach_lora(loaded: LoadedModel, lora: LoraRecipe, train: TrainRecipe, *, use_reentrant: bool = True):
    """Freeze the base and wrap it with LoRA adapters (qlora and lora)."""
    freeze_base(loaded.model, train, use_reentrant=use_reentrant)
    loaded.model = wrap_lora(loaded.model, lora, loaded.is_encoder_decoder, loaded.source)
    return loaded.model


def prompt_tuning_init_text(method: MethodRecipe, prompt: PromptRecipe) -> str:
    """The text the virtual tokens start from: the recipe's, else the template with its placeholders removed."""
    if method.prompt_tuning_init_text is not None:
        return method.prompt_tuning_init_text
    text = prompt.template
    for name in placeholders(text):
        text = text.replace("{" + name + "}", " ")
    return " ".join(text.split())


def attach_prompt_tuning(loaded: LoadedModel, method: MethodRecipe, prompt: PromptRecipe, train: TrainRecipe):
    """Freeze the base and prepend `num_virtual_tokens` trainable embeddings to every input (PEFT prompt tuning).

    Starting from the embeddings of a task description trains faster and more stably than random vectors
    (Lester et al. 2021); PEFT repeats or cuts the text's tokens to num_virtual_tokens.
    """
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    freeze_base(loaded.model, train)
    text = prompt_tuning_init_text(method, prompt) if loaded.source is not None else ""
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM if loaded.is_encoder_decoder else TaskType.CAUSAL_LM,
        num_virtual_tokens=method.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=text or None,
        tokenizer_name_or_path=loaded.source if text else None,
    )
    loaded.model = get_peft_model(loaded.model, config)
    return loaded.model


def task_type(loaded: LoadedModel):
    from peft import TaskType

    return TaskType.SEQ_2_SEQ_LM if loaded.is_encoder_decoder else TaskType.CAUSAL_LM


def attach_ln_tuning(loaded: LoadedModel, train: TrainRecipe):
    """Freeze the base and train a copy of every norm layer (PEFT LN tuning; merging swaps the copies in).

    The norms are found by class name on the model itself: PEFT's own table misses most families and, for Qwen2,
    lists only one of a block's two norms."""
    from peft import LNTuningConfig, get_peft_model

    freeze_base(loaded.model, train)
    config = LNTuningConfig(task_type=task_type(loaded), target_modules=norm_layer_names(loaded.model))
    with warnings.catch_warnings():  # PEFT looks for in/out features on every target, which a norm has not
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        loaded.model = get_peft_model(loaded.model, config)
    return loaded.model


def norm_layer_names(model) -> list[str]:
    """The last name part of every innermost norm module: input_layernorm, norm, layer_norm, ln_f..."""
    norms = [(n, m) for n, m in model.named_modules() if "norm" in type(m).__name__.lower()]
    names = {n.rsplit(".", 1)[-1] for n, m in norms if not any(c is not m and "norm" in type(c).__name__.lower()
                                                                 for c in m.modules())}
    if not names:
        raise UserError('method.kind = "ln_tuning": this model has no norm layers to train; choose another method')
    return sorted(names)


def attach_ia3(loaded: LoadedModel, train: TrainRecipe):
    """Freeze the base and scale activations by learned vectors (PEFT IA3): the outputs of the key and value
    projections and the input of the MLP's down projection, as PEFT's table of architectures names them. For a
    family outside that table: every linear layer's output, and the down projection's input (the linear layers that
    read the MLP's width)."""
    from peft import IA3Config, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as KNOWN

    freeze_base(loaded.model, train)
    targets = feedforward = None  # PEFT's table for its model type
    if loaded.model.config.model_type not in KNOWN:
        shapes = {n: m.in_features for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear)}
        widest = max(shapes.values())
        targets, feedforward = "all-linear", sorted({n.rsplit(".", 1)[-1] for n, w in shapes.items() if w == widest})
    config = IA3Config(task_type=task_type(loaded), target_modules=targets, feedforward_modules=feedforward)
    loaded.model = get_peft_model(loaded.model, config)
    return loaded.model


def unfreeze_all(loaded: LoadedModel, train: TrainRecipe):
    """Full fine-tuning: every weight trains (fp32 master weights, see load_model)."""
    model = loaded.model
    for param in model.parameters():
        param.requires_grad = True
    if train.gradient_checkpointing:  # the embedding weight trains, so checkpoint inputs already require grad
        enable_checkpointing(model, use_reentrant=True)
    model.config.use_cache = False
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) as PEFT reports them for adapter models; plain counts for a fully trained model."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
