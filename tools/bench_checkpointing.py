"""Peak memory of one QLoRA training step with gradient checkpointing off, reentrant and non-reentrant.

    python tools/bench_checkpointing.py [--hidden 1024 --layers 8 --seq 512 --batch 4]

Each mode runs in a fresh subprocess on a 4-bit random Llama built from a config (no download), in train mode
(transformers only checkpoints while training). On CUDA it reports torch.cuda.max_memory_allocated over the
loaded model; on CPU the peak bytes of live tensors created during the step, tracked with a dispatch mode (a
process's peak RSS does not show it: the allocator keeps freed pages). qlora_lite uses reentrant checkpoints.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, weakref, torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

class LiveBytes(TorchDispatchMode):
    # peak bytes of the tensors created inside the mode that are still alive (by storage)
    def __init__(self):
        super().__init__(); self.live, self.now, self.peak = {}, 0, 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage(); key = s.data_ptr()
                if key and key not in self.live:
                    self.live[key] = s.nbytes(); self.now += s.nbytes(); self.peak = max(self.peak, self.now)
                    weakref.finalize(s, self.free, key)
        return out
    def free(self, key):
        self.now -= self.live.pop(key, 0)

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
model.train()
x = torch.randint(0, 32000, (a["batch"], a["seq"]), device=model.device)
if cuda:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
tracker = LiveBytes() if not cuda else None
t = time.time()
with tracker or torch.autocast("cuda", dtype=dtype):
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
if cuda:
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
else:
    peak = tracker.peak
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
