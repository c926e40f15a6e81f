"""LoRA on a model: PEFT's `LoraConfig` from the [lora] recipe, with its targets checked against the model's layers.

Used by model.attach_method for training and, through it, by the planner on its meta-device skeleton, so a bad
target fails the same way in `plan` and in `run`.
"""

from __future__ import annotations

import difflib

import torch

from qlora_lite.errors import UserError
from qlora_lite.recipe import LoraRecipe


def wrap_lora(model, lora: LoraRecipe, is_encoder_decoder: bool):
    """PEFT's LoRA on `model` (the planner's meta skeleton too), PEFT's refusals as one recipe error."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    if isinstance(targets, list):
        check_lora_targets(model, targets)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=TaskType.SEQ_2_SEQ_LM if is_encoder_decoder else TaskType.CAUSAL_LM,
        # GPT-2's Conv1D stores weights transposed: PEFT would warn and set this itself
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        if "lora_dropout" in str(e):  # Mixtral-style fused experts (3-D parameters) take no LoRA dropout
            raise UserError(f"lora.dropout: PEFT says: {e} Set lora.dropout = 0 for this model") from None
        raise UserError(f"lora.target_modules: {e}") from None


def check_lora_targets(model, targets: list[str]) -> None:
    """Every listed name must match a layer LoRA can adapt: PEFT is content with one match, so a typo ("v_prj")
    silently trained fewer layers than asked, and a block's name ("self_attn") failed with the block printed."""
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
