"""Evaluation: ROUGE on strings checked by hand, batched greedy generation equal to one-at-a-time generation,
base vs tuned on a trained tiny adapter, and the files evaluation writes."""

import dataclasses
import json
import re

import pytest
import torch

from conftest import make_rows, recipe_text
from qlora_lite import data as data_stage
from qlora_lite import model as model_stage
from qlora_lite.errors import UserError
from qlora_lite.evaluate import (
    base_cache_key, bleu_score, encode_prompts, evaluate_run, forgetting_texts, generate, load_run, pad_batch, rouge_scores,
    split_sentences, text_chunks,
)
from qlora_lite.recipe import load_recipe, recipe_to_toml
from qlora_lite.rundir import RunDir
from qlora_lite.train import train

EVAL_SETTINGS = ["eval.max_new_tokens=24", "eval.batch_size=4", "eval.max_samples=6"]


def make_run(tmp_path, model_dir, data_dir, *, steps=12, overrides=(), **extra):
    """A finished run directory as `run` leaves it (recipe.toml, metrics.jsonl, adapter/), trained for a few
    steps on the 4-bit tiny model; returns (recipe, loaded model still in memory)."""
    path = tmp_path / "r.toml"
    path.write_text(recipe_text(model_dir, data_dir, tmp_path / "runs", name="r", **extra))
    recipe = load_recipe(path, [*EVAL_SETTINGS, f"train.max_steps={steps}", "train.gradient_checkpointing=false",
                                "train.save_steps=1000", *overrides])
    recipe.run_dir.mkdir(parents=True)
    (recipe.run_dir / "recipe.toml").write_text(recipe_to_toml(recipe))
    loaded = model_stage.load_model(recipe.model, recipe.quantization, recipe.train)
    rows = data_stage.load_splits(recipe.data, recipe.prompt)["train"]
    examples, _ = data_stage.build_examples(rows, loaded.tokenizer, recipe.data, recipe.prompt, recipe.train,
                                            loaded.is_encoder_decoder)
    model_stage.attach_lora(loaded, recipe.lora, recipe.train)
    train(loaded, examples, None, recipe.train, RunDir(recipe.run_dir))
    return recipe, loaded


# ---------------------------------------------------------------- metrics


def test_rouge_identical_is_one_and_disjoint_is_zero():
    same = rouge_scores(["Ana brings the cake."], ["Ana brings the cake."])
    assert same == pytest.approx(dict(rouge1=1.0, rouge2=1.0, rougeL=1.0, rougeLsum=1.0))
    assert set(rouge_scores(["red green"], ["blue yellow"]).values()) == {0.0}


def test_rouge_partial_case_by_hand():
    # unigrams: the, cat shared of 3 each -> P = R = F = 2/3; bigrams: "the cat" of 2 each -> 1/2; LCS 2 -> 2/3.
    # A second pair with identical texts: every mean is (partial + 1) / 2.
    got = rouge_scores(["the cat sat", "dogs run"], ["the cat ran", "dogs run"])
    assert got == pytest.approx(dict(rouge1=(2 / 3 + 1) / 2, rouge2=(1 / 2 + 1) / 2, rougeL=(2 / 3 + 1) / 2,
                                     rougeLsum=(2 / 3 + 1) / 2))


def test_rouge_uses_the_stemmer():
    assert rouge_scores(["she brings cakes"], ["she bring cake"])["rouge1"] == pytest.approx(1.0)


def test_rougelsum_scores_sentence_by_sentence():
    prediction, reference = "Ana brings cake. Ben drives home.", "Ben drives home. Ana brings cake."
    assert split_sentences(prediction) == "Ana brings cake.\nBen drives home."
    split = rouge_scores([prediction], [reference])
    assert split["rougeL"] == pytest.approx(0.5)  # one LCS over the whole text: half of it in order
    assert split["rougeLsum"] == pytest.approx(1.0)  # each reference sentence found whole
    assert rouge_scores([prediction], [reference], sentence_split=False)["rougeLsum"] == pytest.approx(0.5)


def test_bleu_is_a_fraction():
    assert bleu_score(["the cat sat on the mat today"], ["the cat sat on the mat today"]) == pytest.approx(1.0)
    assert bleu_score(["red green blue"], ["one two three four"]) == 0.0


# ---------------------------------------------------------------- generation


def briefly_trained(model_dir, seq2seq: bool):
    """The fp32 tiny model after 30 full fine-tuning steps: random tiny models repeat one token whatever the
    prompt, so batching mistakes would not show; this one's greedy output depends on the prompt."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    tokenizer = model_stage.load_tokenizer(str(model_dir))
    torch.manual_seed(0)
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rows = make_rows(64, seed=1)
    for step in range(30):
        batch = rows[step * 16 % 64 :][:16]
        if seq2seq:
            prompts = [tokenizer(r["dialogue"])["input_ids"] for r in batch]
            ids, mask = pad_batch(prompts, tokenizer.pad_token_id, left=False)
            labels, _ = pad_batch([tokenizer(r["summary"])["input_ids"] for r in batch], -100, left=False)
        else:
            eos = [tokenizer.eos_token_id]
            texts = [tokenizer(r["dialogue"] + "\n" + r["summary"])["input_ids"] + eos for r in batch]
            ids, mask = pad_batch(texts, tokenizer.pad_token_id, left=False)
            labels = ids.masked_fill(mask == 0, -100)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), tokenizer


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_t5"])
def test_batched_generation_equals_one_at_a_time(model_fixture, request):
    seq2seq = model_fixture == "tiny_t5"
    model, tokenizer = briefly_trained(request.getfixturevalue(model_fixture), seq2seq)
    rows = make_rows(7, seed=5)
    # Prompts of different lengths, so batches need padding (left for Llama, right for T5's encoder).
    prompts = [tokenizer(r["dialogue"] + ("" if seq2seq else "\n"))["input_ids"] for r in rows]
    prompts = [p[: len(p) - 2 * i] for i, p in enumerate(prompts)]
    settings = dict(is_encoder_decoder=seq2seq, max_new_tokens=16)
    one = generate(model, tokenizer, prompts, batch_size=1, **settings)
    batched = generate(model, tokenizer, prompts, batch_size=3, **settings)
    assert batched == one
    assert len(set(one)) > 1 and all(one)  # the outputs depend on the prompt: the comparison means something
    # Greedy from the model's own generate, one prompt at a time, decoding only the new tokens.
    ids = torch.tensor([prompts[0]])
    out = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, 1:] if seq2seq else out[0, ids.shape[1] :]
    assert one[0] == tokenizer.decode(new, skip_special_tokens=True).strip()


def test_prompt_tuned_generation_batches_only_prompts_of_one_length(tiny_llama):
    """PEFT's prompt tuning drops the position ids that make left padding harmless: a padded row is read at
    shifted positions. Batching prompts of one length only gives each row its own output."""
    from peft import PromptTuningConfig, get_peft_model

    model, tokenizer = briefly_trained(tiny_llama, False)
    torch.manual_seed(0)
    model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    rows = make_rows(6, seed=5)
    prompts = [tokenizer(r["dialogue"] + "\n")["input_ids"][:24 - 6 * (i % 3)] for i, r in enumerate(rows)]
    assert sorted(map(len, prompts)) == [12, 12, 18, 18, 24, 24]  # three lengths, two prompts each
    settings = dict(is_encoder_decoder=False, max_new_tokens=12)
    one = generate(model, tokenizer, prompts, batch_size=1, soft_prompt=True, **settings)
    assert generate(model, tokenizer, prompts, batch_size=6, soft_prompt=True, **settings) == one
    assert generate(model, tokenizer, prompts, batch_size=6, **settings) != one  # padded: why one length a batch


def test_prompt_tuned_generation_is_the_greedy_continuation(tiny_llama):
    """With the KV cache, PEFT's prompt-tuned generate got every token after the first wrong (peft#1391): the
    soft prompt's output must be what a greedy loop over full forward passes gives."""
    from peft import PromptTuningConfig, get_peft_model

    model, tokenizer = briefly_trained(tiny_llama, False)
    torch.manual_seed(0)
    model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.mul_(20)  # a soft prompt that changes the continuation
    prompt = tokenizer(make_rows(1, seed=5)[0]["dialogue"] + "\n")["input_ids"][:20]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    expected = tokenizer.decode(ids[0, len(prompt):], skip_special_tokens=True).strip()
    assert generate(model, tokenizer, [prompt], is_encoder_decoder=False, max_new_tokens=10, batch_size=1,
                    soft_prompt=True) == [expected]


def test_pad_batch_pads_on_the_requested_side():
    ids, mask = pad_batch([[5, 6, 7], [8]], 0, left=True)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], 0, left=False)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------- base vs tuned


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_t5"])
def test_evaluate_run_compares_base_and_tuned_and_writes_its_files(model_fixture, request, tmp_path, tiny_data):
    forgetting = tmp_path / "general.txt"
    forgetting.write_text(" ".join(r["dialogue"] for r in make_rows(40, seed=9)))
    recipe, loaded = make_run(tmp_path, request.getfixturevalue(model_fixture), tiny_data,
                              overrides=[f'eval.forgetting="{forgetting}"', 'eval.metrics=["rouge", "bleu"]'])
    result = evaluate_run(loaded, recipe, recipe.run_dir)

    report = json.loads((recipe.run_dir / "eval.json").read_text())
    rouge = {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert set(report["base"]) == set(report["tuned"]) == rouge | {"bleu"}
    assert report["n"] == result.n == 6 and report["split"] == result.split == "test"
    assert report["generation"]["max_new_tokens"] == 24 and report["generation"]["do_sample"] is False
    assert report["generation"]["prompts_truncated"] == result.prompts_truncated == 0
    assert "sentence" in report["rouge"]["sentence_split"]
    assert report["base"] != report["tuned"]  # twelve steps moved the adapter's outputs
    assert report["tuned"]["rouge1"] > report["base"]["rouge1"]
    assert all(0.0 <= v <= 1.0 for v in [*report["base"].values(), *report["tuned"].values()])
    assert result.base == report["base"] and result.tuned == report["tuned"]

    f = report["forgetting"]
    assert f["chunks"] >= 1 and f["tokens"] > 0 and f["base_loss"] > 0 and f["tuned_loss"] > 0
    assert f["base_loss"] != f["tuned_loss"]
    assert f["loss_change"] == pytest.approx(f["tuned_loss"] - f["base_loss"])

    samples = (recipe.run_dir / "samples.md").read_text()
    assert samples.count("## Example ") == 6
    first_test_row = json.loads((tiny_data / "test.jsonl").read_text().splitlines()[0])
    assert first_test_row["summary"] in samples and first_test_row["dialogue"] in samples
    tuned = re.findall(r"\*\*Tuned:\*\* (.*)", samples)
    base = re.findall(r"\*\*Base:\*\* (.*)", samples)
    assert len(tuned) == len(base) == 6 and tuned != base

    # The base model's outputs depend on none of the training: a second evaluation takes them from the cache, and
    # says so; another generation setting generates them again.
    assert not result.base_from_cache and not report["base_from_cache"]
    again = evaluate_run(loaded, recipe, recipe.run_dir)
    cached = json.loads((recipe.run_dir / "eval.json").read_text())
    assert again.base_from_cache and cached["base_from_cache"] and cached["seconds"]["base"] == 0.0
    assert cached["base"] == report["base"] and cached["tuned"] == report["tuned"]
    assert cached["forgetting"] == report["forgetting"]
    other = dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, max_new_tokens=12))
    assert not evaluate_run(loaded, other, recipe.run_dir).base_from_cache


def test_a_cached_base_evaluation_is_reused_only_when_every_input_is_the_same(tmp_path, tiny_llama, tiny_data):
    """base_cache_key: the same inputs give the same key; a change to any input the base outputs depend on (the
    model's files, how the base is loaded, the prompts and general-text tokens, generation, the device) another."""
    import os

    path = tmp_path / "r.toml"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in tiny_llama.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    path.write_text(recipe_text(model_dir, tiny_data, tmp_path / "runs", name="r"))
    recipe = load_recipe(path, EVAL_SETTINGS)
    tokenizer = model_stage.load_tokenizer(str(model_dir))
    loaded = model_stage.LoadedModel(None, tokenizer, False, "cpu", torch.float32, str(model_dir))
    prompts, chunks = [[1, 5, 6], [1, 7]], [[8, 9, 10, 11]]
    key = base_cache_key(recipe, loaded, prompts, chunks)
    assert key == base_cache_key(load_recipe(path, EVAL_SETTINGS), loaded, [[1, 5, 6], [1, 7]], [[8, 9, 10, 11]])
    assert key == base_cache_key(load_recipe(path, [*EVAL_SETTINGS, "lora.r=4", "train.learning_rate=1"]), loaded,
                                 prompts, chunks)  # what training does is not the base's business

    changed = {
        "another 4-bit type": (load_recipe(path, [*EVAL_SETTINGS, "quantization.quant_type=fp4"]), loaded),
        "no double quant": (load_recipe(path, [*EVAL_SETTINGS, "quantization.double_quant=false"]), loaded),
        "a 16-bit base": (load_recipe(path, [*EVAL_SETTINGS, 'method.kind="lora"']), loaded),
        "the base reloaded": (load_recipe(path, [*EVAL_SETTINGS, 'method.kind="full"']), loaded),
        "max_new_tokens": (load_recipe(path, [*EVAL_SETTINGS, "eval.max_new_tokens=25"]), loaded),
        "batch size": (load_recipe(path, [*EVAL_SETTINGS, "eval.batch_size=3"]), loaded),
        "compute dtype": (recipe, dataclasses.replace(loaded, compute_dtype=torch.bfloat16)),
    }
    keys = {what: base_cache_key(r, l, prompts, chunks) for what, (r, l) in changed.items()}
    keys["a prompt token"] = base_cache_key(recipe, loaded, [[1, 5, 6], [1, 8]], chunks)
    keys["general text"] = base_cache_key(recipe, loaded, prompts, [[8, 9, 10, 12]])
    keys["no general text"] = base_cache_key(recipe, loaded, prompts, None)
    weights = model_dir / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # the weights rewritten
    keys["the model's weights"] = base_cache_key(recipe, loaded, prompts, chunks)
    assert len(set(keys.values()) | {key}) == len(keys) + 1, keys
    assert base_cache_key(load_recipe(path, ["model.trust_remote_code=true"]), loaded, prompts, chunks) is None


def test_held_out_prompts_cut_to_fit_are_counted(tmp_path, tiny_llama, tiny_data):
    """Cut prompts lose the end of their dialogue; eval.json and the eval table say how many."""
    from transformers import AutoTokenizer

    path = tmp_path / "r.toml"
    path.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", name="r"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    rows = [json.loads(line) for line in (tiny_data / "test.jsonl").read_text().splitlines()]
    whole, cut = encode_prompts(rows, load_recipe(path, ["train.max_length=1000"]), tokenizer, False)
    assert cut == 0
    limit = max(len(p) for p in whole) - 3
    recipe = load_recipe(path, [f"train.max_length={limit + 8}", "eval.max_new_tokens=8"])
    prompts, cut = encode_prompts(rows, recipe, tokenizer, False)
    assert cut == sum(len(p) > limit for p in whole) > 0
    for full, short in zip(whole, prompts):
        assert short == full if len(full) <= limit else (len(short) == limit and short[-4:] == full[-4:])


def test_load_run_reproduces_the_in_memory_evaluation(tmp_path, tiny_llama, tiny_data):
    recipe, loaded = make_run(tmp_path, tiny_llama, tiny_data, steps=6)
    in_memory = evaluate_run(loaded, recipe, recipe.run_dir)
    reloaded_recipe, reloaded = load_run(recipe.run_dir)
    assert reloaded_recipe == recipe
    again = evaluate_run(reloaded, reloaded_recipe, recipe.run_dir, split="eval")
    assert again.split == "eval" and again.n == 6
    assert evaluate_run(reloaded, reloaded_recipe, recipe.run_dir).tuned == pytest.approx(in_memory.tuned)


def test_load_run_refuses_a_folder_without_an_adapter(tmp_path):
    (tmp_path / "recipe.toml").write_text("")
    with pytest.raises(UserError, match="no trained weights"):
        load_run(tmp_path)
    with pytest.raises(UserError, match="not a run directory"):
        load_run(tmp_path / "missing")


def test_forgetting_reads_text_and_jsonl_and_chunks_evenly(tmp_path, tiny_llama):
    (tmp_path / "a.txt").write_text("Ana brings the cake to the park.")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": ""}\n{"text": "two"}\n')
    (tmp_path / "c.jsonl").write_text('{"body": "one"}\n')
    assert forgetting_texts(str(tmp_path / "a.txt")) == ["Ana brings the cake to the park."]
    assert forgetting_texts(str(tmp_path / "b.jsonl")) == ["one", "two"]
    with pytest.raises(UserError, match='no "text" column'):
        forgetting_texts(str(tmp_path / "c.jsonl"))
    tokenizer = model_stage.load_tokenizer(str(tiny_llama))
    chunks = text_chunks(["Ana brings the cake to the park at noon. " * 20], tokenizer, 16, most=3)
    assert [len(c) for c in chunks] == [16, 16, 16]
    assert len(text_chunks(["Ana brings the cake."], tokenizer, 64, most=3)) == 1


def test_held_out_rows_that_were_trained_on_are_flagged(tmp_path, tiny_llama, tiny_data, capsys, monkeypatch):
    """data.test pointing at the training file: ROUGE then measures memory. The setup table, eval.json and the
    report say so; a clean split says 0."""
    from qlora_lite import cli
    from qlora_lite.cli import main

    monkeypatch.setattr(cli.console, "width", 300)  # the setup table's row on one line

    path = tmp_path / "r.toml"
    path.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", name="r"))
    evaluate = ["--set", "eval.enabled=true", "--set", "eval.max_samples=4", "--set", "eval.max_new_tokens=4",
                "--set", "train.max_steps=2"]
    assert main(["run", str(path), *evaluate, "--set", f"data.test={tiny_data / 'train.jsonl'}"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "4 rows of the test split for base vs tuned; 4 of them also in the training data" in out
    run_dir = tmp_path / "runs" / "r"
    assert json.loads((run_dir / "eval.json").read_text())["in_train"] == 4
    assert main(["eval", str(run_dir)]) == 0  # evaluated again on its own: counted the same (it wrote null)
    assert json.loads((run_dir / "eval.json").read_text())["in_train"] == 4
    assert "4 of the 4 held-out examples also appear in the training data" in (run_dir / "report.md").read_text()

    assert main(["run", str(path), *evaluate, "--set", "name=clean"]) == 0
    assert "also in the training data" not in capsys.readouterr().out
    assert json.loads((tmp_path / "runs" / "clean" / "eval.json").read_text())["in_train"] == 0
