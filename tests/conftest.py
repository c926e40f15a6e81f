"""Tiny models and data built in-process: random-weight Llama and T5 from configs, BPE tokenizers trained in
seconds, saved with save_pretrained so tests go through the real from_pretrained path. No hub, no network."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena"]
ITEMS = ["cake", "tickets", "keys", "charger", "map", "wine", "books", "tent", "ladder", "camera"]
PLACES = ["station", "office", "park", "gym", "library", "market", "cafe", "school"]
TIMES = ["noon", "five", "six", "seven", "eight", "nine", "ten", "midnight"]


@pytest.fixture(autouse=True, scope="session")
def own_cache(tmp_path_factory):
    """qlora_lite's cache (analyzed skeletons, converted GGUF files, base-model evaluations) in a folder of the
    test session's own: tests neither read what a user's runs cached nor leave anything in it."""
    os.environ["QLORA_LITE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def make_rows(n: int, seed: int) -> list[dict]:
    """Dialogues whose summary copies three facts from them: learnable in a few steps by a tiny model."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(NAMES, 2)
        item, place, time = rng.choice(ITEMS), rng.choice(PLACES), rng.choice(TIMES)
        dialogue = f"{a}: can you bring the {item}?\n{b}: sure, where?\n{a}: at the {place} at {time}\n{b}: ok"
        rows.append({"id": f"t{seed}-{i}", "dialogue": dialogue, "summary": f"{b} brings the {item} to the {place} at {time}."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_tokenizer(corpus: list[str], *, bos: bool, specials: list[str]):
    """A byte-level BPE tokenizer; `bos` = Llama style (<s> before), else T5 style (</s> after)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

def chatml_tokenizer(pre_tokenizer=None):
    """A byte-level BPE tokenizer with SmolLM2's and Qwen's special tokens and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def corpus() -> list[str]:
    rows = make_rows(300, seed=0)
    return [r["dialogue"] for r in rows] + [r["summary"] for r in rows] + ["Summarize:\n\nSummary: "] * 20


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama whose tokenizer has no pad token: the trainer must fall back to pad = eos safely."""
    tokenizer = train_tokenizer(corpus(), bos=True, specials=["<unk>", "<s>", "</s>"])
    return save_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def save_llama(out: Path, tokenizer, **sizes) -> Path:
    """A random-weight Llama of these sizes with `tokenizer`, saved as from_pretrained reads it (seed 0)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **sizes)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_mixtral(out: Path, tokenizer, **sizes) -> Path:
    """A random-weight Mixtral of these sizes (fused experts, 2 per token) with `tokenizer`, saved (seed 0)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, num_experts_per_tok=2,
                           **sizes)
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """GPT-2: Conv1D layers (weights stored transposed) and learned positions."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = train_tokenizer(corpus(), bos=True, specials=["<unk>", "<s>", "</s>"])
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    out = tmp_path_factory.mktemp("tiny-t5")
    tokenizer = train_tokenizer(corpus(), bos=False, specials=["<pad>", "</s>", "<unk>"])
    config = T5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_splits(out: Path, rows, sizes: tuple[int, int, int]) -> Path:
    """train, validation and test .jsonl files in `out` of rows(n, seed=1, 2, 3) with n from `sizes`."""
    for split, n, seed in zip(("train", "validation", "test"), sizes, (1, 2, 3)):
        write_jsonl(out / f"{split}.jsonl", rows(n, seed=seed))
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_splits(tmp_path_factory.mktemp("tiny-data"), make_rows, (64, 8, 8))


def recipe_text(model_dir: Path, data_dir: Path, out_dir: Path, name: str = "t", **extra: str) -> str:
    """A small, fast recipe; `extra` maps a section to extra lines, e.g. train='max_steps = 3'.

    It trains on the CPU whatever the machine: tests assert the CPU path (fp32 compute, adamw_torch, RSS instead of
    GPU readings), which "auto" would swap for the GPU's on a CUDA machine. GPU tests override train.device."""
    sections = {
        "model": f'name = "{model_dir}"',
        "data": f'train = "{data_dir}/train.jsonl"\neval = "{data_dir}/validation.jsonl"\ntest = "{data_dir}/test.jsonl"',
        "prompt": 'template = "Summarize:\\n{dialogue}\\nSummary: "',
        "lora": "r = 8\nalpha = 16\ndropout = 0.0",
        "train": "max_steps = 12\nmicro_batch_size = 8\ngradient_accumulation_steps = 1\nlearning_rate = 5e-3\n"
                 "warmup_ratio = 0.0\nlogging_steps = 1\nsave_steps = 6\nlr_scheduler = \"constant\"\nmax_length = 128\n"
                 'device = "cpu"',
        "eval": "enabled = false",
        "output": f'dir = "{out_dir}"',
    }
    for section, lines in extra.items():
        sections[section] = sections.get(section, "") + "\n" + lines
    body = "\n\n".join(f"[{s}]\n{v}" for s, v in sections.items())
    return f'name = "{name}"\n\n{body}\n'
