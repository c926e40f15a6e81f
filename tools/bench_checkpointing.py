"""Peak memory of one QLoRA training step with gradient checkpointing off, reentrant and non-reentrant.

    python tools/bench_checkpointing.py [--hidden 1024 --layers 8 --seq 512 --batch 4]

Each mode runs in a fresh subprocess on a 4-bit random Llama built from a config (no download). On CUDA it
reports torch.cuda.max_memory_allocated; on CPU the growth of the process's peak RSS over the loaded model,
which counts the same saved activations. qlora_lite's model.attach_lora uses the mode with the lower peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig
from peft import LoraConfig, get_peft_model
a = json.loads(sys.argv[1])
cuda = torch.cuda.is_available()
dtype = torch.bfloat16 if cuda else torch.float32
cfg = LlamaConfig(hidden_size=a["hidden"], intermediate_size=a["hidden"] * 4, num_hidden_layers=a["layers"],
                  num_attention_heads=a["hidden"] // 64, num_key_value_heads=a["hidden"] // 64, vocab_size=32000)
model = AutoModelForCausalLM.from_pretrained(a["dir"], dtype=dtype, device_map={"": 0} if cuda else "cpu",
    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
for p in model.parameters():
    p.requires_grad = False
if a["mode"] != "off":
    reentrant = a["mode"] == "reentrant"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
x = torch.randint(0, 32000, (a["batch"], a["seq"]), device=model.device)
if cuda:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.time()
with torch.autocast("cuda", dtype=dtype, enabled=cuda):
    loss = model(input_ids=x, labels=x).loss
loss.backward()
if cuda:
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
print(json.dumps({"mode": a["mode"], "peak_over_model_mib": peak / 2**20, "seconds": time.time() - t}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 4, num_hidden_layers=args.layers,
                             num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                             vocab_size=32000)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
        print(f"Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq} tokens, "
              f"4-bit NF4 base, LoRA r16 all-linear, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
        print(f"{'checkpointing':<15}{'peak over model (MiB)':>24}{'step (s)':>10}")
        for mode in ("off", "reentrant", "non-reentrant"):
            payload = json.dumps({**vars(args), "dir": folder, "mode": mode})
            out = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True)
            if out.returncode:
                print(f"{mode:<15} failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{mode:<15}{r['peak_over_model_mib']:>24.0f}{r['seconds']:>10.1f}")


if __name__ == "__main__":
    main()
