"""The memory planner against published measurements, and against real training steps on a CUDA GPU.

    python tools/bench_memory.py [--json]             # no GPU: planner vs cited figures, error in %
    python tools/bench_memory.py --gpu [--json]       # CUDA: a grid of real steps, one fresh process each
        [--models smollm2-135m,flan-t5-base] [--methods qlora,lora,full,prompt_tuning] [--grid quick|full]
        [--points 512x4,4096x1]       # instead of the grid: max_length x micro-batch, r16, checkpointing
    python tools/bench_memory.py --gpu --smoke        # the --gpu code path on CPU with a tiny model (no numbers)

Each --gpu point builds the model from a config dict below with random weights (same memory as real ones), loads
it with qlora_lite.model for the point's method (load_model, attach_method), runs 3 optimizer steps of 2
accumulated micro-batches as the trainers do (TRL's fused LM head for decoder-only, the model's own loss for T5,
bf16 autocast, the Trainer's optimizer) on a padded batch of max_length tokens, then a batched greedy generate();
it reports torch.cuda.max_memory_allocated/reserved, and what the device holds beyond the allocator's reserve after
training (NVML's used memory less its reading before the process touched CUDA: the CUDA context, cuBLAS workspaces
and kernels), the figure the plan counts as cuda_context.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # published_configs

from qlora_lite.memory import GIB, analyze, phases  # noqa: E402
from qlora_lite.recipe import (  # noqa: E402
    EvalRecipe, LoraRecipe, MethodRecipe, ModelRecipe, QuantizationRecipe, Recipe, TrainRecipe,
)

from published_configs import CONFIGS, MOE_CONFIGS  # noqa: E402

SMOKE = {  # --smoke: the --gpu code path on CPU in seconds
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False),
    "tiny-t5": dict(model_type="t5", d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=256,
                    feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
}
MODELS = {**CONFIGS, **SMOKE}


def make_config(values: dict):
    from transformers import AutoConfig

    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def recipe_for(name="bench", *, train=None, lora=None, quant=None, eval_=None, method=None) -> Recipe:
    return Recipe(name=name, model=ModelRecipe(name="bench"), train=TrainRecipe(**(train or {})),
                  lora=LoraRecipe(**(lora or {})), quantization=QuantizationRecipe(**(quant or {})),
                  eval=EvalRecipe(**(eval_ if eval_ is not None else {"enabled": False})),
                  method=MethodRecipe(**(method or {})))


def predict(recipe: Recipe, config_values: dict, device: str = "cuda") -> dict:
    """The planner's figures for one recipe, per phase, in GiB."""
    arch = analyze(recipe, make_config(config_values))
    (train, train_alloc), (evals, eval_alloc) = phases(recipe, arch, device)
    return {"train": train, "train_allocated": train_alloc, "eval": evals, "eval_allocated": eval_alloc,
            "total_params": arch.params.total, "trainable": arch.params.trainable}


# ---------------------------------------------------------------- published figures


@dataclasses.dataclass(frozen=True)
class Published:
    source: str
    what: str
    model: str
    measured: float
    unit: str  # "MiB", "GiB" (2^30), "GB" (1e9), or "B/param" (bytes per parameter)
    recipe: dict
    quantity: str  # which planner figure: see QUANTITIES
    note: str


QUANTITIES = {
    "weights": lambda p: p["train"]["weights_4bit"] + p["train"]["weights_16bit"],
    "lora_0.2pct_bf16": lambda p: 0.002 * p["total_params"] * 2 / GIB,
    "train_reserved": lambda p: sum(p["train"].values()) - p["train"]["cuda_context"],
    "train_allocated": lambda p: p["train_allocated"],
    "full_states": lambda p: sum(p["train"][k] for k in ("trainable_weights", "gradients", "optimizer")),
    "full_weights": lambda p: p["train"]["trainable_weights"] + p["train"]["autocast_copies"],
    "optimizer": lambda p: p["train"]["optimizer"],
}
UNITS = {"MiB": 2**20, "GiB": 2**30, "GB": 1e9}
QLORA = "QLoRA paper, arXiv 2305.14314 (7B, batch 1: 567/26/18/5,048 MB)"
LITGPT = "litgpt config_hub/finetune/README.md (A10G, bf16-true, Alpaca2k)"
ZERO = "ZeRO paper, arXiv 1910.02054, sec. 3.1 (mixed-precision Adam: 2 + 2 + 12 bytes/param)"
HF_ANATOMY = "transformers docs, model_memory_anatomy (GPU memory usage: bytes per parameter)"
FULL = {"method": {"kind": "full"}, "quant": {"compute_dtype": "bf16"},
        "train": {"micro_batch_size": 1, "max_length": 512}}
LITGPT_NOTE = ("different stack: litgpt's own model, bf16 LoRA/AdamW state and activations, no checkpointing, "
               "full bf16 logits")
PUBLISHED = [
    Published("peft issue #3265 (torch.cuda.memory_allocated after from_pretrained; torch 2.5, bnb 0.46)",
              "4-bit base loaded, allocated", "mistral-7b-v0.3", 3956, "MiB", {"quant": {"compute_dtype": "bf16"}},
              "weights", "same stack: NF4 + double quant, bf16 embeddings and lm_head; a measurement"),
    Published("AnswerDotAI/fsdp_qlora nbs/00-profile_lora_qlora.ipynb (memory_allocated after loading, GB = 1e9)",
              "4-bit base loaded, allocated", "llama-1b-synthetic", 0.882, "GB",
              {"quant": {"compute_dtype": "bf16", "double_quant": False}}, "weights",
              "same stack: NF4 without double quant, bf16 storage, embeddings, lm_head and norms; a measurement"),
    Published("ReaLLMASIC/ReaLLM-Forge PR #130 (Mixtral-8x7B-Instruct through transformers + bitsandbytes 4-bit)",
              "4-bit base loaded", "mixtral-8x7b", 25, "GB",
              {"quant": {"compute_dtype": "bf16", "double_quant": False}, "lora": {"dropout": 0.0}}, "weights",
              "a rounded figure ('around 25GB'), transformers 4's default 4-bit (no double quant), where "
              "bitsandbytes quantized the experts as linear layers; experts4bit packs them to the same bytes. If its "
              "GB are nvidia-smi's GiB, the plan's 24.8 GiB is -0.7%. Also: huggingface/blog mixtral.md asks for "
              "'at least 24GB VRAM' to load it in 4-bit; nexusquant PR #29 saw NF4 Mixtral peak at ~24-25 GB"),
    Published(QLORA, "4-bit base model", "llama-2-7b", 5048,
              "MiB", {"quant": {"compute_dtype": "bf16"}}, "weights",
              "our stack: NF4+DQ linears, bf16 embeddings/head; the paper's code upcast those to fp32 (next row)"),
    Published(QLORA, "4-bit base, paper's dtypes", "llama-2-7b", 5048, "MiB",
              {"quant": {"compute_dtype": "fp32"}}, "weights",
              "prepare_model_for_kbit_training: embeddings, lm_head, norms fp32; the paper says the base 'consumes' "
              "5,048 MB without saying how it was measured, whether MB is 1e6 or 2^20, or whether the CUDA context "
              "is in it: not a calibration target"),
    Published(QLORA, "LoRA = 0.2% of weights, bf16", "llama-2-7b", 26, "MiB",
              {}, "lora_0.2pct_bf16", "checks total_params only (6.74B)"),
    Published("torchtune docs tutorials/qlora_finetune.rst", "peak reserved, training", "llama-2-7b", 9.29, "GiB",
              {"train": {"micro_batch_size": 2, "max_length": 512, "optimizer": "adamw_torch"},
               "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}, "train_reserved",
              "torchao NF4, own model; its 9.13 GiB reserved at model init (bf16 load, then quantize) sets this "
              "high-water mark, so training's own peak is lower: an upper bound"),
    Published(LITGPT, "peak allocated, llama-2-7b/qlora.yaml", "llama-2-7b", 13.68, "GB",
              {"train": {"micro_batch_size": 2, "max_length": 512, "gradient_checkpointing": False,
                         "optimizer": "adamw_torch"}, "quant": {"double_quant": False},
               "lora": {"r": 32, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}}, "train_allocated", LITGPT_NOTE),
    Published(LITGPT, "peak allocated, llama-3-8b/qlora.yaml", "llama-3-8b", 17.41, "GB",
              {"train": {"micro_batch_size": 2, "max_length": 512, "gradient_checkpointing": False,
                         "optimizer": "adamw_torch"}, "quant": {"double_quant": False},
               "lora": {"r": 32, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}}, "train_allocated", LITGPT_NOTE),
    Published(LITGPT, "peak allocated, mistral-7b/qlora.yaml", "mistral-7b", 14.29, "GB",
              {"train": {"micro_batch_size": 2, "max_length": 512, "gradient_checkpointing": False,
                         "optimizer": "adamw_torch"}, "quant": {"double_quant": False},
               "lora": {"r": 32, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}}, "train_allocated", LITGPT_NOTE),
    Published("litgpt tutorials/resource-tables.md (A100, bnb 0.41)", "LoRA r8 q,v, nf4-dq, 1 x 1304 tokens",
              "llama-2-7b", 13.84, "GB",
              {"train": {"micro_batch_size": 1, "max_length": 1304, "gradient_checkpointing": False,
                         "optimizer": "adamw_torch"},
               "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}}, "train_allocated", LITGPT_NOTE),
    Published(ZERO, "full FT: weights + grads + Adam state", "llama-2-7b", 16, "B/param",
              {**FULL, "train": {**FULL["train"], "optimizer": "adamw_torch"}}, "full_states",
              "a rule, not a measurement; our stack keeps fp32 weights and gradients (autocast casts on the fly): "
              "4 + 4 + 8, the same 16"),
    Published(HF_ANATOMY, "full FT: weights in mixed precision", "llama-2-7b", 6, "B/param", FULL, "full_weights",
              "fp32 weights + autocast's cached bf16 copy at the end of the forward; embeddings and norms are never "
              "cast, TRL casts the LM head tile by tile"),
    Published(HF_ANATOMY, "full FT: 8-bit AdamW state", "llama-2-7b", 2, "B/param", FULL, "optimizer",
              "bitsandbytes adds an fp32 absmax per 256 values, and the Trainer keeps nn.Embedding weights 32-bit"),
]


def published_rows() -> list[dict]:
    rows = []
    for item in PUBLISHED:
        plan = predict(recipe_for(**item.recipe), {**CONFIGS, **MOE_CONFIGS}[item.model])
        per = plan["total_params"] if item.unit == "B/param" else UNITS[item.unit]
        predicted = QUANTITIES[item.quantity](plan) * GIB / per
        rows.append({"source": item.source, "what": item.what, "model": item.model, "unit": item.unit,
                     "measured": item.measured, "predicted": round(predicted, 2),
                     "error_pct": round(100 * (predicted - item.measured) / item.measured, 1), "note": item.note})
    return rows


def default_rows() -> list[dict]:
    """The planner on each configured model with the recipe defaults (r16 all-linear, 4 x 512, eval 8 x 128)."""
    rows = []
    for name, values in CONFIGS.items():
        plan = predict(recipe_for(eval_={}), values)
        rows.append({"model": name, "total_params": plan["total_params"], "trainable": plan["trainable"],
                     "train_gib": round(sum(plan["train"].values()), 2),
                     "eval_gib": round(sum(plan["eval"].values()), 2),
                     "kv_cache_gib": round(plan["eval"]["kv_cache"], 2)})
    return rows


def method_rows() -> list[dict]:
    """Each method on the 7B configs: 1 x 512 tokens, checkpointing, paged 8-bit AdamW, bf16, eval 8 x (512 + 128)."""
    rows = []
    for name in ("llama-2-7b", "qwen2.5-7b"):
        for kind in ("qlora", "lora", "prompt_tuning", "full"):
            plan = predict(recipe_for(eval_={}, method={"kind": kind}, quant={"compute_dtype": "bf16"},
                                      train={"micro_batch_size": 1, "max_length": 512}), CONFIGS[name])
            train_gib, eval_gib = sum(plan["train"].values()), sum(plan["eval"].values())
            rows.append({"model": name, "method": kind, "trainable": plan["trainable"],
                         "train_gib": round(train_gib, 2), "eval_gib": round(eval_gib, 2),
                         "peak_gib": round(max(train_gib, eval_gib), 2)})
    return rows


# ---------------------------------------------------------------- real steps on a GPU


def grid(models: list[str], methods: list[str], size: str) -> list[dict]:
    lengths, batches, ranks = ((256, 1024), (1, 4), (16,)) if size == "quick" else \
        ((256, 1024, 2048), (1, 4, 8), (16, 64))
    return [{"model": m, "method": k, "max_length": s, "micro_batch_size": b, "r": r, "gradient_checkpointing": ckpt}
            for m in models for k in methods for s in lengths for b in batches for r in ranks for ckpt in (True, False)]


def point_recipe(point: dict, device: str) -> Recipe:
    enc_dec = MODELS[point["model"]]["model_type"] == "t5"
    lengths = ({"max_source_length": point["max_length"], "max_target_length": 128} if enc_dec
               else {"max_length": point["max_length"]})
    return recipe_for(train={"micro_batch_size": point["micro_batch_size"], "device": device,
                             "gradient_checkpointing": point["gradient_checkpointing"], **lengths},
                      lora={"r": point["r"], "alpha": 2 * point["r"]}, eval_={"batch_size": 4, "max_new_tokens": 32},
                      method={"kind": point.get("method", "qlora")})


def chosen_points(models: list[str], methods: list[str], points: str) -> list[dict]:
    """--points 512x4,4096x1: each max_length x micro-batch at the recipe's defaults (r16, checkpointing)."""
    sizes = [tuple(int(n) for n in p.split("x")) for p in points.split(",")]
    return [{"model": m, "method": k, "max_length": s, "micro_batch_size": b, "r": 16, "gradient_checkpointing": True}
            for m in models for k in methods for s, b in sizes]


def run_gpu(models: list[str], methods: list[str], size: str, smoke: bool, points: str | None = None) -> list[dict]:
    rows, cache = [], Path(tempfile.mkdtemp(prefix="bench-memory-"))
    if smoke:
        points = [{"model": m, "method": k, "max_length": 64, "micro_batch_size": 2, "r": 8,
                   "gradient_checkpointing": ckpt} for m in SMOKE for k in methods for ckpt in (True, False)]
    else:
        points = chosen_points(models, methods, points) if points else grid(models, methods, size)
    for point in points:
        rows.append(measure_point(point, cache, "cpu" if smoke else "cuda"))
        # One JSON line per point on stderr as it finishes: a run cut off by a time limit keeps what it measured.
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def measure_point(point: dict, cache: Path, device: str) -> dict:
    """Real steps in a fresh process (its own CUDA context and peak counters), against the plan of the same recipe."""
    job = {**point, "cache": str(cache), "device": device}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                          text=True, timeout=1800)
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode or not lines:
        return {**point, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    measured = json.loads(lines[-1])
    plan = predict(point_recipe(point, device), MODELS[point["model"]], device)
    reserve = plan["train"]["allocator_reserve"]
    base_copy = plan["eval"]["weights_16bit"] if point["method"] == "full" else 0.0  # the worker reloads none
    predicted = {"train_alloc": plan["train_allocated"], "train_reserved": plan["train_allocated"] + reserve,
                 "eval_alloc": plan["eval_allocated"] - base_copy,
                 "eval_reserved": plan["eval_allocated"] - base_copy + plan["eval"]["allocator_reserve"]}
    row = {**point, "load_reserved_meas": round(measured["load_reserved"], 3),
           "context_pred": plan["train"]["cuda_context"], "context_meas": measured.get("context")}
    for key, value in predicted.items():
        row[f"{key}_pred"], row[f"{key}_meas"] = round(value, 3), round(measured[key], 3)
        row[f"{key}_err_pct"] = round(100 * (value - measured[key]) / measured[key], 1) if measured[key] else None
    return row


def worker(job: dict) -> dict:
    """One grid point in a fresh process: build, load, 3 training steps, one generate(); peaks in GiB."""
    import torch

    from qlora_lite.model import attach_method, load_model

    device = job["device"]
    recipe = point_recipe(job, device)
    before = device_used() if device == "cuda" else None  # in a fresh process: no CUDA context yet
    folder = save_random_model(job["model"], Path(job["cache"]), device)
    if device == "cuda":  # the first point made the random model on the GPU: not part of loading it
        torch.cuda.reset_peak_memory_stats()
    recipe = dataclasses.replace(recipe, model=ModelRecipe(name=str(folder)))
    loaded = load_model(recipe.model, recipe.quantization, recipe.train, recipe.method)
    model = attach_method(loaded, recipe).train()
    autocast = torch.autocast(device, dtype=loaded.compute_dtype, enabled=loaded.compute_dtype != torch.float32)
    optimizer, loss_fn = make_optimizer(model, device), make_loss(loaded)
    batch = padded_batch(loaded, recipe, device)
    loading = peaks("load", device)  # transformers quantizes tensor by tensor: cached blocks stay reserved
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        for _ in range(2):  # accumulated micro-batches: the second one's forward runs beside the first's gradients
            with autocast:
                loss = loss_fn(model, batch)
            loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    result = peaks("train", device)
    after = device_used() if before is not None else None
    if after is not None:
        result["context"] = round(after - before - torch.cuda.memory_reserved() / GIB, 3)
    del optimizer, loss, batch
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model.eval()
    prompts = torch.randint(3, 200, (recipe.eval.batch_size, recipe.train.max_source_length if loaded.is_encoder_decoder
                                     else recipe.train.max_length), device=device)
    with autocast, torch.no_grad():
        model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False, use_cache=True,
                       max_new_tokens=recipe.eval.max_new_tokens, min_new_tokens=recipe.eval.max_new_tokens,
                       pad_token_id=0)
    return {**loading, **result, **peaks("eval", device)}


def device_used() -> float | None:
    """NVML's used memory of GPU 0 in GiB (None without NVML). Read before this process creates its CUDA context,
    it is what other processes hold; the bench runs alone."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / GIB
    except Exception:  # no NVML (pynvml.NVMLError_LibraryNotFound, ...): the row says nothing of the context
        return None


def peaks(phase: str, device: str) -> dict:
    import torch

    if device != "cuda":
        return {f"{phase}_alloc": 0.0, f"{phase}_reserved": 0.0}
    torch.cuda.synchronize()
    return {f"{phase}_alloc": torch.cuda.max_memory_allocated() / GIB,
            f"{phase}_reserved": torch.cuda.max_memory_reserved() / GIB}


def save_random_model(name: str, cache: Path, device: str) -> Path:
    """The model with random weights and a stand-in tokenizer, saved once per process tree."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, PreTrainedTokenizerFast

    folder = cache / name
    if (folder / "config.json").is_file():
        return folder
    config = make_config(MODELS[name])
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device(device):
        model = auto.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache() if device == "cuda" else None
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"t{i}": i + 3 for i in range(200)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                        pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return folder


def make_optimizer(model, device: str):
    """The optimizer the Trainer builds for this recipe (paged 8-bit AdamW on CUDA)."""
    from transformers import Trainer, TrainingArguments

    from qlora_lite.train import pick_optimizer

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), optim=pick_optimizer(TrainRecipe(), device),
                             use_cpu=device == "cpu", report_to="none")
    return Trainer(model=model, args=args).create_optimizer()


def make_loss(loaded):
    """Decoder-only: TRL SFTTrainer's fused LM head; encoder-decoder: the model's own loss (Seq2SeqTrainer)."""
    if loaded.is_encoder_decoder:
        return lambda model, batch: model(**batch).loss
    from trl.trainer.utils import add_fused_lm_head

    base = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
    return lambda model, batch: model(**batch, fused_lm_head=True).loss


def padded_batch(loaded, recipe: Recipe, device: str) -> dict:
    """micro_batch_size rows of max_length tokens, the last row padded at its end: the collator's worst case."""
    import torch

    t = recipe.train
    length = t.max_source_length if loaded.is_encoder_decoder else t.max_length
    ids = torch.randint(3, 200, (t.micro_batch_size, length), device=device)
    mask = torch.ones_like(ids)
    mask[-1, -max(1, length // 8):] = 0
    if loaded.is_encoder_decoder:
        labels = torch.randint(3, 200, (t.micro_batch_size, t.max_target_length), device=device)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


# ---------------------------------------------------------------- output


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ap.add_argument("--gpu", action="store_true", help="run the grid of real training steps (needs CUDA)")
    ap.add_argument("--smoke", action="store_true", help="with --gpu: one tiny point on CPU, to test the code path")
    ap.add_argument("--models", default="smollm2-135m,flan-t5-base", help=f"for --gpu, among {', '.join(CONFIGS)}")
    ap.add_argument("--methods", default="qlora", help="for --gpu, among qlora, lora, full, prompt_tuning")
    ap.add_argument("--grid", choices=("quick", "full"), default="quick")
    ap.add_argument("--points", help="for --gpu, instead of the grid: max_length x micro-batch, e.g. 512x4,4096x1")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.gpu:
        rows = run_gpu(args.models.split(","), args.methods.split(","), args.grid, args.smoke, args.points)
        columns = ["model", "method", "max_length", "micro_batch_size", "r", "gradient_checkpointing"] + [
            f"{k}_{s}" for k in ("train_alloc", "train_reserved", "eval_alloc", "eval_reserved")
            for s in ("pred", "meas", "err_pct")] + ["load_reserved_meas", "context_pred", "context_meas", "error"]
        print(json.dumps(rows, indent=1)) if args.json else print_table(rows, columns)
        return 0
    published, defaults, methods = published_rows(), default_rows(), method_rows()
    if args.json:
        print(json.dumps({"published": published, "defaults": defaults, "methods": methods}, indent=1))
        return 0
    print("Planner vs published measurements (error = predicted vs measured)\n")
    print_table(published, ["model", "what", "unit", "measured", "predicted", "error_pct", "source"])
    print("\nNotes:")
    for r in published:
        print(f"  {r['model']}, {r['what']}: {r['note']}")
    print("\nPlanner on recipe defaults (r16 all-linear, micro-batch 4 x 512, checkpointing, eval 8 x (512 + 128))\n")
    print_table(defaults, ["model", "total_params", "trainable", "train_gib", "eval_gib", "kv_cache_gib"])
    print("\nPlanner per method (1 x 512 tokens, checkpointing, paged 8-bit AdamW, bf16, eval 8 x (512 + 128))\n")
    print_table(methods, ["model", "method", "trainable", "train_gib", "eval_gib", "peak_gib"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
