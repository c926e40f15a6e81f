"""LoRA on a model: PEFT's `LoraConfig` from the [lora] recipe, with its targets checked against the model's layers,
and its variants: rsLoRA, DoRA (QDoRA on a 4-bit base) and the initialisations that leave the base weights alone.

Used by model.attach_method for training and, through it, by the planner on its meta-device skeleton, so a bad
target fails the same way in `plan` and in `run`.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from qlora_lite.errors import UserError
from qlora_lite.recipe import LoraRecipe

# Why an init cannot be used here (recipe.py asks before anything loads). PiSSA, CorDA and OLoRA start the adapter
# from the base weights' own decomposition and subtract it from them: the base a run trains on is then not the base
# that evaluation, --resume and merge load again from model.name (and on a 4-bit base it is quantized once more).
REWRITES_BASE = ("rewrites the base weights (base minus the adapter's starting product), so the adapter would no "
                 "longer fit the base that evaluation, --resume and merge load again from model.name{four_bit}; use "
                 'init = "default" or "gaussian"')
INIT_REFUSED = {
    "pissa": REWRITES_BASE, "corda": REWRITES_BASE, "olora": REWRITES_BASE,
    "eva": "starts from an SVD of each layer's inputs over the training data (peft.initialize_lora_eva_weights), a "
           'pass before training that qlora_lite does not run yet; use init = "default" or "gaussian"',
}


def init_problem(init: str, four_bit: bool) -> str | None:
    """Why [lora] init cannot be used on this base, or None."""
    if init == "loftq" and not four_bit:
        return ('fits the adapter to the 4-bit rounding error of the base, and this method loads a 16-bit base; use '
                'it with method.kind = "qlora", or init = "default"')
    if init in INIT_REFUSED:
        return INIT_REFUSED[init].format(four_bit=" (here a 4-bit base, which would be quantized again)"
                                         if four_bit else "")
    return None


def wrap_lora(model, lora: LoraRecipe, is_encoder_decoder: bool, source: str | None = None):
    """PEFT's LoRA on `model` (the planner's meta skeleton too, source None), PEFT's refusals as one recipe error.

    init = "loftq" starts the adapter at the rank-r SVD of what NF4 rounding took from each weight (LoftQ, one
    iteration, as PEFT's replace_lora_weights_loftq, which runs on CUDA only and ignores alpha / r): the 4-bit base
    plus the adapter starts closer to the original model. The base weights stay as they were."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers.pytorch_utils import Conv1D

    from qlora_lite.experts4bit import route_lora

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    if isinstance(targets, list):
        check_lora_targets(model, targets)
    config = LoraConfig(
        target_parameters=experts_peft_leaves_out(model) if targets == "all-linear" else None,
        exclude_modules=linear_routers(model) if targets == "all-linear" else None,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights={"default": True, "loftq": True}.get(lora.init, lora.init),
        task_type=TaskType.SEQ_2_SEQ_LM if is_encoder_decoder else TaskType.CAUSAL_LM,
        # GPT-2's Conv1D stores weights transposed: PEFT would warn and set this itself
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as e:
        if "lora_dropout" in str(e):  # Mixtral-style fused experts (3-D parameters) take no LoRA dropout
            raise UserError(f"lora.dropout: PEFT says: {e} Set lora.dropout = 0 for this model") from None
        raise UserError(f"lora.target_modules: {e}") from None
    route_lora(model)  # LoRA on 4-bit experts (experts4bit.quantize_experts): PEFT's factors, expert by expert
    if lora.init == "loftq" and source is not None:
        loftq_init(model, source)
    return model


def experts_peft_leaves_out(model) -> list[str] | None:
    """The fused expert weights of a model whose experts PEFT does not itself add to "all-linear" (it maps only the
    families whose transformers 4 experts were linear layers: Mixtral, Qwen3-MoE, OLMoE, ...; not Qwen2-MoE or
    Gemma-4 in PEFT 0.21), so that all-linear means the experts too in every family experts4bit runs. None when
    there are none, or PEFT adds them."""
    from qlora_lite.experts4bit import WEIGHTS

    try:  # private, hence guarded: without it, PEFT's own mapping is assumed to cover nothing
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN as mapped
    except ImportError:
        mapped = {}
    if getattr(getattr(model, "config", None), "model_type", None) in mapped:
        return None
    leaves = sorted({f"{name.rpartition('.')[2]}.{w}" for name, module in model.named_modules()
                     if hasattr(module, "has_gate") for w in WEIGHTS
                     if getattr(getattr(module, w, None), "ndim", 0) == 3})
    return leaves or None


def linear_routers(model) -> list[str] | None:
    """Routers that are nn.Linear subclasses with a forward of their own (PhiMoE's and Llama 4's, which return a
    tuple): all-linear would wrap them and PEFT's LoRA fails adding to a tuple. Other subclasses (Falcon's
    FalconLinear) return a tensor and are adapted."""
    import torch

    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and "Router" in type(module).__name__
             and type(module).forward is not torch.nn.Linear.forward]
    return names or None


def loftq_init(model, source: str) -> None:
    """Set each 4-bit layer's lora_B @ lora_A * scaling to the rank-r SVD of W - NF4(W), W read from the model's
    safetensors files; the round trip is export.nf4_round_trip, the weights the 4-bit layer holds."""
    import bitsandbytes as bnb
    import torch
    from safetensors import safe_open

    from qlora_lite.export import nf4_round_trip
    from qlora_lite.recipe import QuantizationRecipe

    files = {}
    for path in sorted(Path(source).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            files.update(dict.fromkeys(f.keys(), path))
    if not files:
        raise UserError(f'lora.init = "loftq" reads the unquantized weights from safetensors files; {source} has '
                        f'none: use init = "default"')
    for name, layer in model.base_model.model.named_modules():
        base = getattr(layer, "base_layer", None)
        if not isinstance(base, bnb.nn.Linear4bit) or "default" not in getattr(layer, "lora_A", {}):
            continue
        key = f"{name}.weight"
        if key not in files:
            raise UserError(f'lora.init = "loftq": {key} is not in the safetensors files of {source} under that '
                            f'name; use init = "default"')
        with safe_open(files[key], "pt") as f:
            weight = f.get_tensor(key).float()
        state = base.weight.quant_state
        quant = QuantizationRecipe(quant_type=state.quant_type, double_quant=state.nested)
        rounded = nf4_round_trip(weight, quant, base.compute_dtype or torch.float32)
        u, s, vh = torch.linalg.svd(weight - rounded, full_matrices=False)
        r, scaling = layer.r["default"], layer.scaling["default"]
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(u[:, :r] * s[:r].sqrt() / scaling)
            layer.lora_A["default"].weight.copy_(s[:r].sqrt()[:, None] * vh[:r])


def check_lora_targets(model, targets: list[str]) -> None:
    """Every listed name must match a layer LoRA can adapt: PEFT is content with one match, so a typo ("v_prj")
    silently trained fewer layers than asked, and a block's name ("self_attn") failed with the block printed."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    found = {t: [m for n, m in model.named_modules() if n == t or n.endswith("." + t)] for t in targets}
    wrong = [t for t in targets if not any(isinstance(m, kinds) for m in found[t])]
    if not wrong:
        return
    target, found = wrong[0], found[wrong[0]]
    layers = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds)})
    close = difflib.get_close_matches(target, layers, n=1)
    fused = [n for n, p in model.named_parameters() if p.ndim >= 3 and (n.endswith("." + target) or f".{target}." in n)]
    what = (f"{target!r} is a {type(found[0]).__name__}, not a layer LoRA adapts" if found
            else f"{target!r} matches no layer of this model")
    if fused:  # Mixtral-style experts stored as one 3-D tensor: PEFT adapts them as parameters, under all-linear
        what = (f"{target!r} {'holds' if found else 'names'} fused expert weights (3-D tensors), not a layer: PEFT "
                f"adapts them only under target_modules = \"all-linear\"")
    raise UserError(f"lora.target_modules: {what}" + (f" (did you mean {close[0]!r}?)" if close else "")
                    + f"; its linear and embedding layers: {', '.join(layers)}; or use \"all-linear\"")
