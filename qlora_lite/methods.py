"""What each fine-tuning method is, in one table. Every module asks this table what a method does (is the base
4-bit, what trains, is there an adapter to merge, how compare scales its learning rate); none compares method names.

A new method is a row here, its recipe keys in recipe.py, and its attach step in model.attach_method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Method:
    name: str  # [method] kind
    summary: str  # one line for the report and the model card
    family: Literal["selective", "reparameterization", "additive"]  # the PEFT taxonomy compare groups by
    trains: Literal["lora", "soft prompt", "norm layers", "ia3 vectors", "every weight"]  # what attach_method trains
    base_in_4bit: bool | None  # True: always; False: never; None: as quantization.load_in_4bit says
    lr_scale: float  # compare trains at the recipe's learning rate times this (one rate cannot suit all methods)
    not_merged: str | None = None  # why there is no adapter to merge into the weights; None: it merges

    @property
    def has_adapter(self) -> bool:
        """A PEFT adapter on a frozen base (saved alone); else every weight trained (saved as a whole model)."""
        return self.trains != "every weight"

    @property
    def uses_lora(self) -> bool:
        return self.trains == "lora"

    def quantizes(self, load_in_4bit: bool) -> bool:
        """Whether the base loads in 4-bit, given quantization.load_in_4bit."""
        return load_in_4bit if self.base_in_4bit is None else self.base_in_4bit


# Families (Lialin et al. 2023, "Scaling Down to Scale Up"): selective methods train a subset of the original weights,
# reparameterization trains a low-rank form of the update (LoRA), additive methods train new parameters the base never
# had (soft prompts, IA3's scaling vectors). Full fine-tuning is filed as selective: it updates the original weights
# themselves and adds nothing, the limiting case where the subset is every weight.
# Learning-rate scales follow common practice: LoRA 1e-4..6e-4, full fine-tuning ~10x lower (it diverges at a LoRA
# rate), prompt tuning 1e-2..3e-1 (it barely moves at one). IA3's vectors and the norms' gains start at 1.0 and
# move by about one learning rate per step, so a LoRA rate leaves them where they began: IA3 trains at 3e-3 in its
# paper (T-Few), 15x the recipe's 2e-4; LN tuning at the same order (10x).
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("qlora", "QLoRA (LoRA on a 4-bit base)", "reparameterization", "lora", base_in_4bit=True, lr_scale=1.0),
    Method("lora", "LoRA on a 16-bit base", "reparameterization", "lora", base_in_4bit=False, lr_scale=1.0),
    Method("full", "full fine-tuning (every weight, fp32 master weights)", "selective", "every weight",
           base_in_4bit=False, lr_scale=0.1,
           not_merged="full fine-tuning trained every weight: what it saved is already the whole model"),
    Method("prompt_tuning", "prompt tuning", "additive", "soft prompt", base_in_4bit=None, lr_scale=50.0,
           not_merged="prompt tuning learns virtual input tokens, not weight updates: there is nothing to merge; "
                      "load its adapter with peft.PeftModel.from_pretrained on the base"),
    Method("ln_tuning", "LayerNorm tuning (only the norm layers' weights train)", "selective", "norm layers",
           base_in_4bit=None, lr_scale=10.0),
    Method("ia3", "IA3 (learned vectors scale keys, values and the MLP's down projection)", "additive",
           "ia3 vectors", base_in_4bit=None, lr_scale=15.0),
)}
