"""The price of 4-bit experts: tokens/s of a training step (forward + backward) of a small random Mixtral-shaped
model whose fused experts are 4-bit (qlora_lite.experts4bit), against the same model with unquantized experts, side
by side in one process, with LoRA on attention only and on attention and experts; and the bytes of expert weights.

    OMP_NUM_THREADS=1 python tools/bench_experts4bit.py        # about a minute on 2 CPU cores
    python tools/bench_experts4bit.py --hidden 512 --experts 8 --steps 10

All three variants load the same checkpoint in 4-bit with bitsandbytes (attention layers are Linear4bit in each) in
the compute dtype fp32 (CPU). "unquantized" runs transformers' default experts implementation (grouped_mm),
"unquantized eager" its per-expert loop, which is the loop the 4-bit experts run: the gap between those two is the
price of dequantizing (LoRA on attention only). With LoRA on the experts too, PEFT's own path (the unquantized
rows) adds the low-rank delta to the whole 3-D stack each step, where the 4-bit loop applies it to each expert's
inputs. Steps alternate between variants so a busy machine slows them alike; medians are printed.
Ratios matter, not seconds: this machine is shared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXPERTS = ("unquantized", "unquantized eager", "4-bit experts")
VARIANTS = tuple((kind, lora) for lora in ("attention", "attention + experts") for kind in EXPERTS)


def build(path: Path, args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=args.experts,
                           num_experts_per_tok=args.top_k, vocab_size=args.vocab, max_position_embeddings=args.tokens)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def load(path: Path, variant: str, lora: str):
    """One variant, with LoRA on q_proj, v_proj and, when `lora` says so, on both fused expert weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_lite.experts4bit import quantize_experts, route_lora

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant, device_map="cpu", dtype=torch.float32,
        experts_implementation="eager" if variant == "unquantized eager" else None)
    if variant == "4-bit experts":
        quantize_experts(model, "nf4", True, torch.float32)
    experts = ["gate_up_proj", "down_proj"] if lora == "attention + experts" else None
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             target_parameters=experts))
    route_lora(model)
    model.train()
    return model


def expert_bytes(model) -> int:
    """Bytes of the experts' weights: the fused parameters, or the 4-bit bytes and constants that replace them."""
    from qlora_lite.experts4bit import Packed4bit

    total = 0
    for module in model.modules():
        if isinstance(module, Packed4bit):
            total += sum(b.numel() * b.element_size() for b in module.buffers())
        elif not hasattr(module, "gate_up_proj_4bit"):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False) if p.ndim == 3)
    return total


def step_seconds(model, ids) -> float:
    start = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> int:
    import torch

    from qlora_lite.cli import quiet_libraries

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant, after one warm-up step")
    args = parser.parse_args()
    quiet_libraries(False)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args)
        models = {v: load(Path(tmp), *v) for v in VARIANTS}
    ids = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    for model in models.values():
        step_seconds(model, ids)  # warm-up
    seconds = {v: [] for v in VARIANTS}
    for _ in range(args.steps):
        for v, model in models.items():
            seconds[v].append(step_seconds(model, ids))

    tokens = args.batch * args.tokens
    print(f"Mixtral-shaped: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"{args.experts} experts, top {args.top_k}; {args.batch} x {args.tokens} tokens a step; fp32 on CPU, "
          f"{torch.get_num_threads()} thread(s); median of {args.steps} steps")
    print(f"{'LoRA on':<21}{'experts':<20}{'tokens/s':>10}{'time / 4-bit':>14}{'expert MiB':>12}")
    for (kind, lora), model in models.items():
        median = statistics.median(seconds[kind, lora])
        base = statistics.median(seconds["4-bit experts", lora])
        print(f"{lora:<21}{kind:<20}{tokens / median:>10.0f}{median / base:>14.2f}"
              f"{expert_bytes(model) / 2**20:>12.2f}")
    numel = args.layers * args.experts * 3 * args.hidden * args.intermediate
    print(f"(the same experts in bf16 would take {2 * numel / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
