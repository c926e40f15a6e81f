"""Stage 6: merge a run's adapter into an unquantized copy of its base and save a plain transformers model.

Inputs: a run directory (its recipe, adapter and evaluation when evaluated). Output: out_dir with safetensors
weights, config, generation config, tokenizer, a model card and the merge check; a `MergeResult`.

Never into 4-bit weights: PEFT would re-quantize the merged weights (peft#2321). The base loads unquantized on
the CPU. With base = "dequantized" every weight the 4-bit model quantized is first replaced by its NF4
quantize-then-dequantize round trip, the weights the adapter was trained against (axolotl does the same), so the
export is the model that was trained and evaluated; base = "original" merges into the untouched weights.

The round trip quantizes a plain tensor with bitsandbytes and dequantizes the result. Reading the weights back
from a loaded 4-bit layer is a trap on CPU: bitsandbytes 0.50 repacks them there into a layout that
`dequantize_4bit` (and PEFT's `dequantize_bnb_weight`) silently decode wrong.

The merged model's logits are then compared with the model it stands for, on a few fixed inputs: the 4-bit base
+ adapter (dequantized) or the unmerged base + adapter (original), as max |diff| / max |reference logit|.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_lite.experts4bit import WEIGHTS, dequantize_experts, fused_experts, quantize_experts, route_lora
from qlora_lite import model as model_stage
from qlora_lite.errors import UserError
from qlora_lite.recipe import QuantizationRecipe, Recipe
from qlora_lite.report import metrics_table, recipe_summary
from qlora_lite.rundir import MERGE_CHECK, MODEL_CARD, RunDir, export_clash, read_eval_json, read_run
from qlora_lite.source import CONFIG_FILE, resolve_model_source

log = logging.getLogger(__name__)

BLOCKSIZE = 64  # bitsandbytes' Linear4bit default; BitsAndBytesConfig does not change it
MAX_SHARD_SIZE = "5GB"
# Largest accepted max |diff| / max |reference logit|, for the export dtype or the reference's compute dtype,
# whichever is looser. Measured on SmolLM2-135M (30 layers): correct merges 2e-6 in fp32, 1.9e-2 in fp16,
# 5.9e-2 in bf16 (rounding every weight); a merge into the wrong base (original vs 4-bit reference) 0.33.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 1.5e-1}
CHECK_TEXTS = (
    ("Amy: are we still on for lunch?\nTom: yes, at noon by the station.", "Amy and Tom meet for lunch."),
    ("The committee approved the budget after a long debate about the new library.", "The budget passed."),
    ("Ravi: my train is late, start without me\nLea: ok, we'll save you a seat", "Ravi is late."),
)


@dataclass(frozen=True)
class MergeCheck:
    reference: str  # what the merged model was compared with
    max_abs_diff: float
    logit_scale: float  # max |logit| of the reference
    relative_diff: float  # max_abs_diff / logit_scale
    tolerance: float
    passed: bool


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    dtype: str
    base: str  # "dequantized" or "original": what the adapter was merged into
    rounded_weights: int  # weights replaced by their NF4 round trip (0 for "original")
    check: MergeCheck
    seconds: float


@dataclass(frozen=True)
class Reference:
    description: str
    logits: list[torch.Tensor]
    compute_dtype: torch.dtype
    quantized: list[str]  # names of the Linear layers the 4-bit model quantized


def merge_run(run_dir: str | Path, out_dir: str | Path, *, dtype: str = "bf16", base: str = "dequantized",
              force: bool = False) -> MergeResult:
    """Merge the run's adapter into its base, save to out_dir, verify the logits; see the module docstring.

    A non-empty out_dir is refused unless `force`; with it, the files written here replace their namesakes
    (and transformers removes weight shards of an earlier export), everything else stays. The run directory, its
    adapter/, model/ and checkpoints/ (and what is inside) and its parents are refused even with it. A run trained
    without 4-bit (quantization.load_in_4bit = false) has no rounded weights: "dequantized" means "original".
    """
    from transformers import AutoTokenizer

    started = time.monotonic()
    rd, out_dir = RunDir(Path(run_dir)), Path(out_dir)
    run_dir = rd.path
    if dtype not in model_stage.DTYPES or base not in ("dequantized", "original"):
        raise UserError(f"merge: dtype must be bf16, fp16 or fp32, base dequantized or original; got {dtype}, {base}")
    check_out_not_in_run(out_dir, run_dir)
    check_out_dir(out_dir, force)
    recipe = read_run(run_dir)
    if skip := recipe.method.spec.not_merged:
        raise UserError(f"{run_dir}: {skip}")
    base = merge_base(recipe, base)
    if base == "original" and recipe.method.spec.uses_lora and recipe.lora.init == "loftq":
        raise UserError(f'{run_dir}: lora.init = "loftq" started the adapter at the NF4 rounding error of the base '
                        f'weights; merged into the original weights it would add that correction twice. Merge with '
                        f'--base dequantized (the default)')
    tokenizer = AutoTokenizer.from_pretrained(rd.adapter, trust_remote_code=recipe.model.trust_remote_code)
    torch_dtype = model_stage.DTYPES[dtype]
    if base == "dequantized":
        reference = four_bit_reference(recipe, run_dir, tokenizer)  # freed before the full-size model loads
        model = load_unquantized(recipe, torch_dtype)
        rounded = round_trip_weights(model, reference.quantized, recipe.quantization, reference.compute_dtype)
        rounded += round_trip_experts(model, recipe.quantization, reference.compute_dtype)
        log.info("replaced %d weights by their %s round trip", rounded, recipe.quantization.quant_type)
        model = load_adapter(model, run_dir)
    else:
        model = load_adapter(load_unquantized(recipe, torch_dtype), run_dir)
        reference = Reference(f"unmerged base + adapter ({dtype}, cpu)",
                              logits(model, check_inputs(tokenizer, model.config)), torch_dtype, [])
        rounded = 0
    merged = model.merge_and_unload(safe_merge=True).to(torch_dtype)
    tolerance = max(TOLERANCE[torch_dtype], TOLERANCE[reference.compute_dtype])
    check = compare(logits(merged, check_inputs(tokenizer, merged.config)), reference, tolerance)
    log.info("merge check against %s: %.2e of the logit scale", check.reference, check.relative_diff)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, max_shard_size=MAX_SHARD_SIZE)  # also writes generation_config.json
    tokenizer.save_pretrained(out_dir)
    (out_dir / MERGE_CHECK).write_text(json.dumps(dataclasses.asdict(check), indent=2) + "\n")
    result = MergeResult(out_dir, dtype, base, rounded, check, time.monotonic() - started)
    (out_dir / MODEL_CARD).write_text(model_card(recipe, rd, result))
    return result


def merge_base(recipe: Recipe, base: str) -> str:
    """The base a merge uses: a run trained without 4-bit has no rounded weights, so "dequantized" is "original"."""
    return base if recipe.load_in_4bit else "original"


def check_out_not_in_run(out_dir: Path, run_dir: Path) -> None:
    """Refuse, even with --force, an --out where the export would overwrite what training saved (the adapter's
    own config and weights, say) or mix a full model into the run directory or its parents."""
    clash = export_clash(out_dir.resolve(), run_dir.resolve())
    if clash:
        raise UserError(f"--out {out_dir} is {clash}; merging there would overwrite what training saved: "
                        f"choose another folder (default: {RunDir(run_dir).merged})")


def check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a folder for the merged model")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(
            f"--out {out_dir} is not empty; give a new or empty folder, or add --force to write into it "
            f"(it replaces the files the export writes, earlier weight shards included, and keeps everything else)"
        )


# ---------------------------------------------------------------- models


def load_unquantized(recipe: Recipe, dtype: torch.dtype):
    """The base on the CPU in the export dtype. Weights stream in (transformers 5 builds on the meta device), so
    the peak is one model in `dtype`: about 16 GB for an 8B model in bf16, 32 GB in fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    source = resolve_model_source(recipe.model)
    config = AutoConfig.from_pretrained(source, trust_remote_code=recipe.model.trust_remote_code)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    return auto.from_pretrained(source, dtype=dtype, device_map="cpu", trust_remote_code=recipe.model.trust_remote_code,
                                use_kernels=False)  # as model.load_model loads it


def load_adapter(model, run_dir: Path):
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, RunDir(run_dir).adapter)
    route_lora(model)  # LoRA on 4-bit experts: expert by expert (experts4bit)
    return model


def four_bit_reference(recipe: Recipe, run_dir: Path, tokenizer) -> Reference:
    """The run's model as trained (4-bit base loaded as training loads it, adapter on top): its logits on the
    check inputs, its compute dtype and the names of the layers it quantized."""
    import bitsandbytes as bnb

    train = dataclasses.replace(recipe.train, device="auto")  # the training GPU may not be on this machine
    loaded = model_stage.load_model(recipe.model, recipe.quantization, train, recipe.method)
    quantized = [n for n, m in loaded.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    model = load_adapter(loaded.model, run_dir)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # The path training took. In inference mode on CPU, bitsandbytes 0.50 repacks the weights with bf16
            # scales and computes at bf16 precision: 1.9% of the logit scale off on SmolLM2-135M.
            module.train()
    compute = str(loaded.compute_dtype).removeprefix("torch.")
    reference = Reference(
        f"4-bit base + adapter (bitsandbytes {recipe.quantization.quant_type}, {compute} compute, {loaded.device})",
        logits(model, check_inputs(tokenizer, model.config), loaded.compute_dtype), loaded.compute_dtype, quantized,
    )
    del model, loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return reference


def nf4_round_trip(weight: torch.Tensor, quant: QuantizationRecipe, quantized_dtype: torch.dtype) -> torch.Tensor:
    """`weight` as the 4-bit model holds it: cast to the dtype it was quantized from, quantized (blocksize 64,
    the run's quant type and double quantization) and dequantized, returned in weight's dtype."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(
        weight.detach().to(quantized_dtype).contiguous(), blocksize=BLOCKSIZE,
        compress_statistics=quant.double_quant, quant_type=quant.quant_type,
    )
    return F.dequantize_4bit(packed, state).to(weight.dtype)


def round_trip_weights(model, names: list[str], quant: QuantizationRecipe, quantized_dtype: torch.dtype) -> int:
    """Replace, layer by layer and in place, each named layer's weight by its NF4 round trip; returns the count.
    GPT-2's Conv1D stores its weight as (in, out): transformers quantizes the transpose, and so does this."""
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), (torch.nn.Linear, Conv1D))]
    if missing:
        raise RuntimeError(f"quantized layers missing from the unquantized model: {missing[:3]}")
    with torch.no_grad():
        for name in names:
            weight = modules[name].weight
            if isinstance(modules[name], Conv1D):
                weight.copy_(nf4_round_trip(weight.t(), quant, quantized_dtype).t())
            else:
                weight.copy_(nf4_round_trip(weight, quant, quantized_dtype))
    return len(names)


def round_trip_experts(model, quant: QuantizationRecipe, quantized_dtype: torch.dtype) -> int:
    """Fused MoE expert weights as training held them: cast to the dtype they were quantized from, quantized expert
    by expert and dequantized (experts4bit), back in the model's dtype; the number of weights replaced."""
    modules = fused_experts(model)
    for _, module in modules:
        for name in WEIGHTS:
            getattr(module, name).data = getattr(module, name).data.to(quantized_dtype)
    count = quantize_experts(model, quant.quant_type, quant.double_quant, quantized_dtype)
    dequantize_experts(model)
    return count


# ---------------------------------------------------------------- the check


def check_inputs(tokenizer, config) -> list[dict[str, torch.Tensor]]:
    """A few fixed inputs: prompt tokens, plus decoder tokens (start + a short summary) for encoder-decoders."""
    inputs = []
    for text, summary in CHECK_TEXTS:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        if not getattr(config, "is_encoder_decoder", False):
            inputs.append({"input_ids": ids})
            continue
        target = tokenizer(summary, add_special_tokens=False)["input_ids"][:8]
        inputs.append({"input_ids": ids, "decoder_input_ids": torch.tensor([[config.decoder_start_token_id, *target]])})
    return inputs


def logits(model, inputs: list[dict], compute_dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """On a GPU, under the autocast the model trained in (T5 on an fp16-only card: none, fp16 overflows it)."""
    device = next(model.parameters()).device
    with torch.no_grad(), model_stage.autocast(device.type, compute_dtype):
        return [model(**{k: v.to(device) for k, v in x.items()}).logits.float().cpu() for x in inputs]


def compare(merged: list[torch.Tensor], reference: Reference, tolerance: float) -> MergeCheck:
    diff = max((m - r).abs().max().item() for m, r in zip(merged, reference.logits))
    scale = max(r.abs().max().item() for r in reference.logits)
    relative = diff / scale if scale else float("inf")
    # A NaN anywhere makes `relative <= tolerance` false: a broken merge never passes.
    return MergeCheck(reference.description, diff, scale, relative, tolerance, passed=relative <= tolerance)


# ---------------------------------------------------------------- model card


def model_card(recipe: Recipe, rd: RunDir, result: MergeResult) -> str:
    merged_into = {
        "dequantized": "the NF4-rounded base (each quantized weight replaced by its 4-bit round trip: the weights "
        "the adapter was trained against)",
        "original": "the original base weights",
    }[result.base]
    lines = [
        "---", f"base_model: {recipe.model.name}", f"license: {base_license(recipe)}", "library_name: transformers",
        "tags: [qlora_lite, lora, merged]", "---", "", f"# {recipe.name} (merged)", "",
        f"The LoRA adapter of the qlora_lite run `{recipe.name}` merged into {merged_into}, saved in {result.dtype}.",
        "Load it with `AutoModel...from_pretrained` like any transformers model.", "", "## Recipe", "",
        "| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in recipe_summary(recipe)), "",
    ]
    report = readable_eval_json(rd.eval_json())
    if report:
        lines += [f"## Evaluation (before merging, from {rd.eval_json().name})", "", *metrics_table(report), ""]
    check = result.check
    lines += [
        "## Merge check", "",
        f"Logits of this model vs {check.reference} on {len(CHECK_TEXTS)} fixed inputs: max |diff| "
        f"{check.max_abs_diff:.3g} at logit scale {check.logit_scale:.3g} = {check.relative_diff:.2e} "
        f"(tolerance {check.tolerance:.0e}, {'passed' if check.passed else 'FAILED'}).", "",
    ]
    return "\n".join(lines)


def readable_eval_json(path: Path) -> dict | None:
    """eval.json's scores, or None when it is missing or damaged: the card is written after the merge succeeded,
    and a bad eval.json (which `report` names) must not cost the export."""
    try:
        return read_eval_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def base_license(recipe: Recipe) -> str:
    """The license in the base model's card (its README front matter) or config, else "unknown"."""
    source = Path(resolve_model_source(recipe.model))
    card = source / MODEL_CARD
    if not card.is_file() and not source.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(recipe.model.name, MODEL_CARD)
        card = Path(cached) if isinstance(cached, str) else card
    if card.is_file():
        front = re.match(r"---\n(.*?)\n---", card.read_text(encoding="utf-8", errors="replace"), re.S)
        found = re.search(r"^license:\s*(\S+)", front.group(1), re.M) if front else None
        if found:
            return found.group(1).strip("\"'")
    config = source / CONFIG_FILE
    if config.is_file():
        return str(json.loads(config.read_text()).get("license") or "unknown")
    return "unknown"
