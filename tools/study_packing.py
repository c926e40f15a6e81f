"""Study for `[train] packing = true`: is a packed batch (several examples in one row, position ids restarting at 0,
no attention mask) exactly the same computation as each example alone, on this stack?

    python tools/study_packing.py            # about a minute on 2 CPU cores

Tiny random-weight Llama and Qwen2 models (hidden 64, 2 layers) are built from configs (no download). For each
architecture and attention implementation it prints the max |logit difference| and the per-example loss
difference between a packed batch and each example run alone, for:

  trl-padfree     the batch TRL's padding-free collator builds from one packed row (input_ids, labels,
                  position_ids, cu_seq_lens_q/k, max_length_q/k, seq_idx; no attention_mask)
  posids-only     the same without the cu_seq_lens / max_length / seq_idx keys (position ids alone)
  rows-separate   two packed rows kept as two rows (batch of 2, the short one padded, pad tokens as a sequence
                  of their own), no attention_mask: what an own collator would build (`rows_collator`)
  rows-no-cu_seq_lens   the same without cu_seq_lens (varlen-ref only: flash infers them only for a batch of 1)
  rows+pad-mask   rows-separate plus a padding attention_mask (0 over the pad tokens)
  +mask-ones      the TRL batch plus an attention_mask of ones (expected to leak across examples on sdpa/eager)
  use_cache-on    the TRL batch with config.use_cache = True and no use_cache argument (a cache disables
                  the detection of packed sequences in masking_utils)
  no-restart      position ids 0..n-1 over the whole row, no mask: plain causal attention (the leak, for scale)

`varlen-ref` is transformers' own flash-attention dispatch (`_flash_attention_forward`: the branch that takes
cu_seq_lens, the one that infers them from position_ids, the one that unpads by an attention mask) with the
flash kernels replaced by an exact per-sequence SDPA on CPU: it checks what reaches the varlen kernel, not the
CUDA kernel's numerics. Then: LoRA (PEFT) and a 4-bit nf4 base on CPU, loss normalisation (padded vs packed,
num_items_in_batch), gradient checkpointing, and the padding share / attention work of padded vs packed batches
on random lengths.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

IGNORE = -100
VOCAB = 128
LEAK_TOLERANCE = 1e-4  # a packed batch is "exact" below this max |logit diff|
torch.set_num_threads(min(2, torch.get_num_threads()))


# ---------------------------------------------------------------- models and examples


def sizes(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                tie_word_embeddings=False, use_cache=False,
                initializer_range=0.2,  # larger than the default 0.02, so a leak moves the logits visibly
                **extra)


def tiny(arch: str, attn: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**sizes()))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**sizes()))
        with torch.no_grad():  # Qwen2's q/k/v biases start at zero: give them values so they take part
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.normal_(0, 0.2)
    model.config._attn_implementation = attn
    return model.eval()


def make_examples(n: int, seed: int) -> list[dict]:
    """What data.build_examples makes for a decoder-only model: BOS + prompt + target + EOS, labels -100 over the
    prompt (BOS included)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, target = rng.randint(4, 14), rng.randint(2, 8)
        ids = [1] + [rng.randint(3, VOCAB - 1) for _ in range(prompt + target - 1)] + [2]
        labels = [IGNORE] * prompt + ids[prompt:]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return out


def trl_collator(padding_free: bool):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)


def packed_row(examples: list[dict]) -> dict:
    """One row as trl.pack_dataset ("bfd") stores it: input_ids and labels concatenated, seq_lengths."""
    return {"input_ids": [t for e in examples for t in e["input_ids"]],
            "labels": [t for e in examples for t in e["labels"]],
            "seq_lengths": [len(e["input_ids"]) for e in examples]}


def rows_collator(rows: list[dict]) -> dict:
    """An own collator keeping packed rows separate: position ids restart per example, the short rows padded with
    pad tokens that form a sequence of their own (labels -100), no attention_mask; cu_seq_lens over the flattened
    (batch * length) tokens for flash-attention varlen."""
    width = max(len(r["input_ids"]) for r in rows)
    ids, labels, pos, seg_lengths = [], [], [], []
    for r in rows:
        pad = width - len(r["input_ids"])
        ids.append(r["input_ids"] + [0] * pad)
        labels.append(r["labels"] + [IGNORE] * pad)
        lengths = list(r["seq_lengths"]) + ([pad] if pad else [])
        pos.append([p for n in lengths for p in range(n)])
        seg_lengths += lengths
    for row_labels, row_pos in zip(labels, pos):  # the first token of each example is no target of the one before
        for i, p in enumerate(row_pos):
            if p == 0:
                row_labels[i] = IGNORE
    cu = torch.tensor([0] + seg_lengths).cumsum(0).to(torch.int32)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(seg_lengths),
            "max_length_k": max(seg_lengths)}


# ---------------------------------------------------------------- a CPU stand-in for flash-attention varlen

CALLS: list[str] = []  # which flash entry point ran: "varlen" or "dense"


def _ref_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False):
    """flash_attn_varlen_func's contract, exactly, with one SDPA per sequence: q (total, heads, dim)."""
    CALLS.append("varlen")
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale,
                                                        enable_gqa=True).transpose(0, 1)
    return out


def _ref_dense(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
               deterministic=False):
    """flash_attn_func's contract: q (batch, length, heads, dim), one causal sequence per row."""
    CALLS.append("dense")
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                          scale=softmax_scale, enable_gqa=True).transpose(1, 2)


def register_varlen_reference() -> str:
    """Register "varlen-ref": transformers' flash_attention_forward and its FA mask, over the kernels above."""
    from transformers import AttentionInterface
    from transformers import modeling_flash_attention_utils as fa
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    name = "varlen-ref"

    def forward(*args, **kwargs):
        fa._loaded_implementation = name  # lazy_import_flash_attention returns these globals for this name
        fa._flash_fn, fa._flash_varlen_fn, fa._flash_with_kvcache_fn = _ref_dense, _ref_varlen, None
        fa._pad_fn, fa._unpad_fn = fa._pad_input, fa._unpad_input
        fa._process_flash_kwargs_fn = fa._lazy_define_process_function(_ref_varlen)
        fa._process_with_kvcache_kwargs_fn = dict
        return flash_attention_forward(*args, **kwargs)

    AttentionInterface.register(name, forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, flash_attention_mask)
    return name


# ---------------------------------------------------------------- comparisons


def segment_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of one example's logits (length, vocab) and labels (length)."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE)


@torch.no_grad()
def alone(model, examples: list[dict]) -> list[tuple[torch.Tensor, float]]:
    out = []
    for e in examples:
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
        res = model(input_ids=ids, labels=labels, use_cache=False)
        out.append((res.logits[0].float(), res.loss.item()))
    return out


@torch.no_grad()
def compare(model, examples: list[dict], reference, batch: dict, spans: list[tuple[int, int, int]], **call):
    """Max |logit diff| and max |loss diff| of each example's span (row, start, end) in `batch`'s logits."""
    logits = model(**batch, **call).logits.float()
    dl = dloss = 0.0
    for (row, start, end), (ref_logits, ref_loss) in zip(spans, reference):
        seg = logits[row, start:end]
        dl = max(dl, (seg - ref_logits).abs().max().item())
        dloss = max(dloss, abs(segment_loss(seg, batch["labels"][row, start:end]).item() - ref_loss))
    return dl, dloss


def spans_of(lengths_by_row: list[list[int]]) -> list[tuple[int, int, int]]:
    spans = []
    for row, lengths in enumerate(lengths_by_row):
        start = 0
        for n in lengths:
            spans.append((row, start, start + n))
            start += n
    return spans


def batches(examples: list[dict]) -> dict:
    """The packed layouts of `examples` (3 of them), with the spans of each example, in example order."""
    trl = trl_collator(True)([packed_row(examples)])
    one_row = [[len(e["input_ids"]) for e in examples]]
    rows = rows_collator([packed_row(examples[:2]), packed_row(examples[2:])])
    two_rows = [[len(e["input_ids"]) for e in examples[:2]], [len(examples[2]["input_ids"])]]
    ones = {**trl, "attention_mask": torch.ones_like(trl["input_ids"])}
    pos_only = {k: trl[k] for k in ("input_ids", "labels", "position_ids")}
    no_restart = {"input_ids": trl["input_ids"], "labels": trl["labels"],
                  "position_ids": torch.arange(trl["input_ids"].shape[1])[None]}
    rows_no_cu = {k: rows[k] for k in ("input_ids", "labels", "position_ids")}
    real = torch.arange(rows["input_ids"].shape[1]) < torch.tensor([sum(r) for r in two_rows])[:, None]
    rows_masked = {**rows, "attention_mask": real.long()}  # 0 over the pad tokens, cu_seq_lens still there
    return {"trl-padfree": (trl, one_row), "posids-only": (pos_only, one_row), "rows-separate": (rows, two_rows),
            "rows-no-cu_seq_lens": (rows_no_cu, two_rows), "rows+pad-mask": (rows_masked, two_rows),
            "+mask-ones": (ones, one_row),
            "no-restart": (no_restart, one_row)}


def verdict(d: float) -> str:
    return "exact" if d < LEAK_TOLERANCE else "LEAKS"


def section_equivalence(examples: list[dict], varlen: str) -> None:
    print("\n== 1. packed vs alone: max |logit diff| / max |per-example loss diff| (3 examples in one batch)")
    print(f"   examples: lengths {[len(e['input_ids']) for e in examples]}, "
          f"target tokens {[sum(t != IGNORE for t in e['labels']) for e in examples]}")
    layouts = batches(examples)
    dense = ["trl-padfree", "posids-only", "rows-separate", "rows+pad-mask", "+mask-ones", "use_cache-on",
             "no-restart"]
    cases = {"sdpa": dense, "eager": dense,
             varlen: ["trl-padfree", "posids-only", "rows-separate", "rows-no-cu_seq_lens", "rows+pad-mask",
                      "+mask-ones"]}
    print(f"   {'arch':6} {'attention':10} {'layout':20} {'logit diff':>11} {'loss diff':>10}  verdict  kernel")
    for arch in ("llama", "qwen2"):
        for attn, names in cases.items():
            model = tiny(arch, attn)
            reference = alone(tiny(arch, "sdpa"), examples)  # every attention against one reference
            for name in names:
                CALLS.clear()
                if name == "use_cache-on":
                    batch, lengths = layouts["trl-padfree"]
                    model.config.use_cache = True
                    dl, dloss = compare(model, examples, reference, batch, spans_of(lengths))
                    model.config.use_cache = False
                else:
                    batch, lengths = layouts[name]
                    dl, dloss = compare(model, examples, reference, batch, spans_of(lengths), use_cache=False)
                kernel = "/".join(sorted(set(CALLS))) if attn == varlen else ""
                print(f"   {arch:6} {attn:10} {name:20} {dl:11.2e} {dloss:10.2e}  {verdict(dl):7}  {kernel}")


def lora(model, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"],
                        init_lora_weights=False)  # B != 0: the adapter changes the output
    return get_peft_model(model, config)


def load_4bit(arch: str, attn: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = tempfile.mkdtemp(prefix="study-packing-")
    tiny(arch, "sdpa").save_pretrained(folder)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, attn_implementation=attn,
                                                     dtype=torch.float32, device_map="cpu")
    return model.eval()


def section_adapters(examples: list[dict], varlen: str) -> None:
    print("\n== 2. the same through PEFT LoRA (B != 0) and a 4-bit nf4 base (compute fp32) + LoRA, llama")
    trl, lengths = batches(examples)["trl-padfree"]
    ones = {**trl, "attention_mask": torch.ones_like(trl["input_ids"])}
    for attn in ("sdpa", "eager", varlen):
        for kind in ("lora", "4bit+lora"):
            try:
                base = tiny("llama", attn) if kind == "lora" else load_4bit("llama", attn)
            except Exception as e:  # noqa: BLE001: a 4-bit load that fails on this machine is a result too
                print(f"   {kind:10} {attn:10} cannot load: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
                continue
            if kind == "4bit+lora":
                kind = f"4bit({type(base.model.layers[0].self_attn.q_proj).__name__})+lora"
            model = lora(base).eval()
            reference = alone(model, examples)
            dl, dloss = compare(model, examples, reference, trl, spans_of(lengths), use_cache=False)
            leak, _ = compare(model, examples, reference, ones, spans_of(lengths), use_cache=False)
            print(f"   {kind:22} {attn:10} trl-padfree logit diff {dl:.2e} loss diff {dloss:.2e} {verdict(dl):6}"
                  f" | +mask-ones {leak:.2e} {verdict(leak)}")


def section_prompt_tuning(examples: list[dict]) -> None:
    from peft import PromptTuningConfig, get_peft_model

    trl, lengths = batches(examples)["trl-padfree"]
    torch.manual_seed(0)
    model = get_peft_model(tiny("llama", "sdpa"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.eval()
    with torch.no_grad():
        reference = [model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0, 4:] for e in examples]
        logits = model(**{k: trl[k] for k in ("input_ids", "position_ids")}, use_cache=False).logits[0, 4:]
    dl = max((logits[s:e] - ref).abs().max().item() for (_, s, e), ref in zip(spans_of(lengths), reference))
    print(f"   prompt tuning (PEFT drops position_ids, one soft prompt per row): logit diff {dl:.2e} {verdict(dl)}")


def section_loss(examples: list[dict]) -> None:
    print("\n== 3. loss normalisation (6 examples): what one micro-batch's loss is")
    model = tiny("llama", "sdpa")
    padded = trl_collator(False)([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    packed = trl_collator(True)([packed_row(examples)])
    with torch.no_grad():
        loss_padded = model(**padded, use_cache=False).loss.item()
        loss_packed = model(**packed, use_cache=False).loss.item()
        per_example = [loss for _, loss in alone(model, examples)]
    counts = [sum(t != IGNORE for t in e["labels"][1:]) for e in examples]
    token_mean = sum(c * l for c, l in zip(counts, per_example)) / sum(counts)
    items_padded = int((padded["labels"][..., 1:] != IGNORE).sum())  # Trainer._get_num_items_in_batch's count
    items_packed = int((packed["labels"][..., 1:] != IGNORE).sum())
    print(f"   padded batch loss {loss_padded:.6f} | packed batch loss {loss_packed:.6f} | token-weighted mean of "
          f"the examples' losses {token_mean:.6f} | plain mean of the examples' losses "
          f"{sum(per_example) / len(per_example):.6f}")
    print(f"   num_items_in_batch (labels[..., 1:] != -100): padded {items_padded}, packed {items_packed}; "
          f"padded tensor {tuple(padded['input_ids'].shape)} = {padded['input_ids'].numel()} tokens, "
          f"packed {tuple(packed['input_ids'].shape)} = {packed['input_ids'].numel()} tokens")
    full = [{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in examples]  # no prompt mask at all
    row = trl_collator(True)([packed_row(full)])
    starts = (row["position_ids"][0] == 0).nonzero().flatten()[1:]
    raw = torch.tensor(packed_row(full)["labels"])
    print(f"   boundary targets (last token of one example -> first of the next): our labels "
          f"{int((packed['labels'][0, starts] != IGNORE).sum())}; labels = input_ids before TRL's collator "
          f"{int((raw[starts] != IGNORE).sum())}, after it {int((row['labels'][0, starts] != IGNORE).sum())}")


def section_checkpointing(examples: list[dict]) -> None:
    print("\n== 4. gradient checkpointing (reentrant, as model.py sets it) on a packed batch, LoRA llama sdpa")
    trl = trl_collator(True)([packed_row(examples)])
    grads = {}
    for mode in ("off", "reentrant", "non-reentrant", "alone-sum"):
        model = lora(tiny("llama", "sdpa"))
        model.train()
        if mode in ("reentrant", "non-reentrant"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
            model.enable_input_require_grads()
        if mode == "alone-sum":  # the examples one by one, summed and divided by the batch's target count
            total = sum(sum(t != IGNORE for t in e["labels"][1:]) for e in examples)
            for e in examples:
                ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
                logits = model(input_ids=ids, use_cache=False).logits[0]
                (F.cross_entropy(logits[:-1], labels[0, 1:], ignore_index=IGNORE, reduction="sum") / total).backward()
        else:
            model(**trl, use_cache=False).loss.backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    ref = grads["off"]
    for mode in ("reentrant", "non-reentrant", "alone-sum"):
        rel = ((grads[mode] - ref).norm() / ref.norm()).item()
        print(f"   LoRA gradient, packed + checkpointing {mode:13} vs packed, none: relative diff {rel:.2e}"
              if mode != "alone-sum" else
              f"   LoRA gradient, examples alone (summed)          vs packed, none: relative diff {rel:.2e}")


def section_padding(seed: int = 0) -> None:
    from datasets import Dataset
    from transformers.trainer_pt_utils import get_length_grouped_indices
    from trl import pack_dataset

    print("\n== 5. padding and attention work on random lengths (2000 examples, max_length 512, micro-batch 8)")
    rng = random.Random(seed)
    lengths = [min(512, max(8, int(rng.lognormvariate(4.8, 0.7)))) for _ in range(2000)]
    micro, budget = 8, 512
    tokens = sum(lengths)
    ideal = sum(n * n for n in lengths)  # score elements a varlen kernel computes

    def padded(order):
        cells = work = 0
        for i in range(0, len(order), micro):
            batch = [lengths[j] for j in order[i:i + micro]]
            cells += len(batch) * max(batch)
            work += len(batch) * max(batch) ** 2
        return 1 - tokens / cells, work / ideal, len(range(0, len(order), micro))

    order = list(range(len(lengths)))
    rng.shuffle(order)
    grouped = get_length_grouped_indices(lengths, micro, generator=torch.Generator().manual_seed(seed))
    ds = Dataset.from_dict({"input_ids": [[0] * n for n in lengths], "labels": [[0] * n for n in lengths]})
    rows = pack_dataset(ds, budget, "bfd")["seq_lengths"]
    row_len = [sum(r) for r in rows]
    flat_cells = flat_work = rows_cells = rows_work = 0
    for i in range(0, len(row_len), micro):
        batch = row_len[i:i + micro]
        flat_cells += sum(batch)
        flat_work += sum(batch) ** 2  # TRL concatenates the micro-batch's rows into one row
        rows_cells += len(batch) * max(batch)
        rows_work += len(batch) * max(batch) ** 2
    print(f"   {tokens} tokens; mean length {tokens / len(lengths):.0f}; attention work = score elements "
          f"(sum of row length^2) over the varlen ideal (sum of example length^2)")
    for name, (pad, work, steps) in (("padded, random order", padded(order)),
                                     ("padded, group_by_length", padded(grouped))):
        print(f"   {name:38} pad share {pad:6.1%}  micro-batches {steps:4}  attention work x{work:5.1f}")
    steps = len(range(0, len(row_len), micro))
    print(f"   {'packed bfd, TRL padding-free (1 row)':38} pad share {0:6.1%}  micro-batches {steps:4}  attention work "
          f"x{flat_work / ideal:5.1f} on sdpa/eager, x1.0 on varlen ({len(rows)} rows, fill "
          f"{tokens / (len(rows) * budget):.1%})")
    print(f"   {'packed bfd, rows kept separate':38} pad share {1 - tokens / rows_cells:6.1%}  micro-batches {steps:4}"
          f"  attention work x{rows_work / ideal:5.1f} on sdpa/eager, x1.0 on varlen")


@torch.no_grad()
def section_timing() -> None:
    print("\n== 6. CPU time of one sdpa forward (llama): 8 packed rows of 256 as one flattened row vs as 8 rows")
    model = tiny("llama", "sdpa")
    rng = random.Random(1)
    per_row = []
    for _ in range(8):
        lengths, left = [], 256
        while left > 0:
            n = min(left, rng.randint(16, 96))
            lengths.append(n)
            left -= n
        per_row.append(lengths)
    pos = torch.tensor([[p for n in row for p in range(n)] for row in per_row])
    ids = torch.randint(3, VOCAB, pos.shape)
    flat = {"input_ids": ids.reshape(1, -1), "position_ids": pos.reshape(1, -1)}
    for name, kwargs in (("one row of 2048 (TRL)", flat), ("8 rows of 256", {"input_ids": ids, "position_ids": pos})):
        best = float("inf")
        for _ in range(4):  # the best of 4 (the first warms up): other processes share these cores
            start = time.perf_counter()
            model(**kwargs, use_cache=False)
            best = min(best, time.perf_counter() - start)
        print(f"   {name:22} {best * 1000:7.1f} ms")


def main() -> None:
    import datasets
    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    started = time.perf_counter()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"a diff under {LEAK_TOLERANCE:g} counts as exact")
    varlen = register_varlen_reference()
    examples = make_examples(3, seed=0)
    section_equivalence(examples, varlen)
    section_adapters(examples, varlen)
    section_prompt_tuning(examples)
    section_loss(make_examples(6, seed=1))
    section_checkpointing(examples)
    section_padding()
    section_timing()
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
