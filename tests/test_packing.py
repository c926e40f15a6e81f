"""Packing: rows hold whole examples within max_length, and a packed batch computes exactly what each example alone
does (logits and loss), on sdpa and eager attention; the same batch with plain causal positions leaks across
examples, so the comparison can tell."""

import random

import pytest
import torch
import torch.nn.functional as F

from qlora_lite import packing
from qlora_lite.data import IGNORE_INDEX
from qlora_lite.rundir import RunDir

PAD = 0


def examples(n: int, seed: int) -> list[dict]:
    """Prompt + target token ids of random lengths, the prompt's labels masked."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(3, 120) for _ in range(rng.randrange(3, 20))]
        target = [rng.randrange(3, 120) for _ in range(rng.randrange(2, 10))] + [2]
        rows.append({"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target})
    return rows


def tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, use_cache=False,
                         initializer_range=0.2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = attn
    return model


def packed_batch(n: int = 12, max_length: int = 48):
    from datasets import Dataset

    rows = examples(n, seed=3)
    packed, stats = packing.pack(Dataset.from_list(rows), max_length)
    return rows, list(packed), stats


def test_rows_hold_whole_examples_within_max_length():
    rows, packed, stats = packed_batch()
    assert all(len(r["input_ids"]) <= 48 and sum(r["seq_lengths"]) == len(r["input_ids"]) for r in packed)
    flat = sorted(tuple(r["input_ids"][s:s + n]) for r in packed
                  for s, n in zip([0, *torch.tensor(r["seq_lengths"]).cumsum(0).tolist()], r["seq_lengths"]))
    assert flat == sorted(tuple(r["input_ids"]) for r in rows)  # each example once, none cut
    assert stats.examples == 12 and stats.rows == len(packed) < 12 and stats.tokens == sum(map(len, flat))
    assert 0.5 < stats.fill <= 1


def test_collated_batch_positions_restart_and_first_tokens_are_no_targets():
    _, packed, _ = packed_batch()
    batch = packing.collate(packed[:2], PAD)
    assert "attention_mask" not in batch and batch["cu_seq_lens_q"].dtype == torch.int32
    for row in range(2):
        starts = (batch["position_ids"][row] == 0).nonzero().flatten()
        assert (batch["labels"][row][starts] == IGNORE_INDEX).all()
    lengths = batch["cu_seq_lens_q"].diff()
    assert lengths.sum() == batch["input_ids"].numel() and batch["max_length_q"] == lengths.max()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_batch_computes_each_example_as_if_alone(attn):
    model = tiny_llama(attn)
    _, packed, _ = packed_batch()
    batch = packing.collate(packed[:3], PAD)
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        leaked = model(input_ids=batch["input_ids"]).logits  # positions 0..n-1 over the row: plain causal attention
    worst = worst_leak = 0.0
    for row, r in enumerate(packed[:3]):
        start = 0
        for n in r["seq_lengths"]:
            ids = torch.tensor([r["input_ids"][start:start + n]])
            labels = torch.tensor([r["labels"][start:start + n]])
            with torch.no_grad():
                alone = model(input_ids=ids).logits[0]
            worst = max(worst, (logits[row, start:start + n] - alone).abs().max().item())
            worst_leak = max(worst_leak, (leaked[row, start:start + n] - alone).abs().max().item())
            loss_alone = F.cross_entropy(alone[:-1], labels[0, 1:], ignore_index=IGNORE_INDEX, reduction="sum")
            loss_packed = F.cross_entropy(logits[row, start:start + n - 1], batch["labels"][row, start + 1:start + n],
                                          ignore_index=IGNORE_INDEX, reduction="sum")
            assert loss_packed.item() == pytest.approx(loss_alone.item(), abs=1e-4)
            start += n
    assert worst < 1e-4, worst
    assert worst_leak > 1e-2, worst_leak  # the comparison sees a leak when there is one


# ---------------------------------------------------------------- through `run`


def write_recipe(tmp_path, model_dir, data_dir, **extra) -> str:
    from conftest import recipe_text

    path = tmp_path / "r.toml"
    path.write_text(recipe_text(model_dir, data_dir, tmp_path / "runs", **extra))
    return str(path)


def test_a_packed_run_trains_on_fewer_rows_and_its_loss_falls(tmp_path, tiny_llama, tiny_data):
    from qlora_lite.recipe import load_recipe
    from qlora_lite.run import run

    recipe = load_recipe(write_recipe(tmp_path, tiny_llama, tiny_data), [
        "train.packing=true", "train.max_steps=8", "train.micro_batch_size=2", "train.max_length=256"])
    seen = []
    result = run(recipe, notify=seen.append)
    setup = next(e for e in seen if type(e).__name__ == "SetUp")
    assert setup.packed.examples == setup.data.rows == 64 and setup.packed.rows < 64 / 4 and setup.packed.fill > 0.8
    assert setup.tokens_per_step == pytest.approx(setup.data.tokens_total / setup.packed.rows * 2)
    assert setup.epochs == pytest.approx(8 * 2 / setup.packed.rows)  # epochs over rows, not examples
    losses = [loss for _, loss in RunDir(result.run_dir).losses()]
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("overrides, message", [
    (["method.kind=prompt_tuning"], "train.packing: prompt tuning puts its virtual tokens"),
    (["train.group_by_length=true"], "remove train.group_by_length"),
])
def test_packing_refusals_in_the_recipe(tmp_path, tiny_llama, tiny_data, capsys, overrides, message):
    from qlora_lite.cli import main

    path = write_recipe(tmp_path, tiny_llama, tiny_data)
    args = [a for o in ["train.packing=true", *overrides] for a in ("--set", o)]
    assert main(["plan", path, *args]) == 2
    assert message in capsys.readouterr().err


def test_packing_an_encoder_decoder_model_is_refused_before_training(tmp_path, tiny_t5, tiny_data, capsys):
    from qlora_lite.cli import main

    assert main(["run", write_recipe(tmp_path, tiny_t5, tiny_data), "--set", "train.packing=true"]) == 2
    assert "train.packing: an encoder-decoder model" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
