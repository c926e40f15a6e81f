"""Data as users have it (issue 18): multi-turn `messages` with the loss on assistant turns only (checked token by
token, end-of-turn included), `prompt_completion`, and [[data.mix]] drawing other sources at their weights."""

import json
from pathlib import Path

import pytest

from conftest import chatml_tokenizer, make_rows, recipe_text, write_jsonl, write_splits
from qlora_lite import data as data_stage
from qlora_lite.cli import main
from qlora_lite.data import IGNORE_INDEX, build_examples, encode_prompt, load_splits
from qlora_lite.errors import UserError
from qlora_lite.recipe import DataRecipe, PromptRecipe, TrainRecipe, load_recipe
from qlora_lite.rundir import RunDir, read_json

CHAT = DataRecipe(train="x.jsonl", format="messages")
CHAT_PROMPT = PromptRecipe(template="{messages}", chat_template=True)


def conversations(n: int, seed: int) -> list[dict]:
    """Two exchanges a row: summarize a dialogue, then say who brings what (both copy facts from the dialogue)."""
    rows = []
    for i, row in enumerate(make_rows(n, seed)):
        turns = [{"role": "user", "content": "Summarize:\n" + row["dialogue"]},
                 {"role": "assistant", "content": row["summary"]},
                 {"role": "user", "content": "Who brings it?"},
                 {"role": "assistant", "content": row["summary"].split(" brings")[0] + "."}]
        if i % 3 == 0:
            turns.insert(0, {"role": "system", "content": "Be brief."})
        rows.append({"id": row["id"], "messages": turns})
    return rows


@pytest.fixture(scope="module")
def tokenizer():
    return chatml_tokenizer()


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer Llama with a ChatML tokenizer whose EOS is <|im_end|>, as SmolLM2-Instruct's."""
    from conftest import save_llama

    return save_llama(tmp_path_factory.mktemp("tiny-chat"), tokenizer, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_splits(tmp_path_factory.mktemp("chat-data"), conversations, (48, 8, 6))


def learned_text(tokenizer, ids, labels) -> list[str]:
    """The labelled stretches of an example, decoded: one string per run of consecutive learned tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current)), current.clear()
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_labels_cover_assistant_turns_and_their_end_of_turn_token_by_token(tokenizer, train_on):
    rows = conversations(3, seed=5)
    data = DataRecipe(train="x.jsonl", format="messages", train_on=train_on)
    ds, stats = build_examples(rows, tokenizer, data, CHAT_PROMPT, TrainRecipe(max_length=512), False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, example in zip(rows, ds):
        ids, labels = example["input_ids"], example["labels"]
        turns = row["messages"]
        # the ids are the chat template's text, and nothing else
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(turns, tokenize=False).rstrip("\n")
        answers = [t["content"] for t in turns if t["role"] == "assistant"]
        expected = [a + "<|im_end|>" for a in (answers if train_on == "all" else answers[-1:])]
        assert learned_text(tokenizer, ids, labels) == expected
        # token by token: learned exactly where the assistant's content tokens and its end-of-turn token are
        learned = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        ends = [i for i, token in enumerate(ids) if token == end]
        assistant_ends = [i for i in ends if i in learned]
        assert len(assistant_ends) == len(expected)  # each trained turn's <|im_end|> is learned ...
        assert all(labels[i] == IGNORE_INDEX for i in ends if i not in assistant_ends)  # ... no user's or system's
        header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        for i in learned:  # no header token is learned
            if ids[i] == header[0]:
                pytest.fail("an <|im_start|> token is labelled")
    assert stats.rows == 3 and stats.truncated_prompts == 0


def test_the_eval_prompt_is_the_training_prefix_before_the_last_answer(tokenizer):
    row = conversations(1, seed=6)[0]
    ds, _ = build_examples([row], tokenizer, CHAT, CHAT_PROMPT, TrainRecipe(max_length=512), False)
    prompt, cut = encode_prompt(row, CHAT, CHAT_PROMPT, tokenizer, 400)
    ids = ds[0]["input_ids"]
    assert not cut and ids[: len(prompt)] == prompt
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(ids[len(prompt):]) == row["messages"][-1]["content"] + "<|im_end|>"
    assert data_stage.target_text(row, CHAT) == row["messages"][-1]["content"]
    assert data_stage.input_text(row, CHAT).endswith("user: Who brings it?")


def test_a_long_conversation_loses_its_oldest_exchanges_and_never_its_last_answer(tokenizer):
    row = conversations(1, seed=7)[0]
    turns = row["messages"]
    long = {"messages": [{"role": "system", "content": "Be brief."}] + turns[-4:-2] * 3 + turns[-2:]}
    full, _ = build_examples([long], tokenizer, CHAT, CHAT_PROMPT, TrainRecipe(max_length=4096), False)
    limit = len(full[0]["input_ids"]) - 5
    cut_ds, stats = build_examples([long], tokenizer, CHAT, CHAT_PROMPT, TrainRecipe(max_length=limit), False)
    assert stats.truncated_prompts == 1 and stats.rows == 1
    kept = tokenizer.decode(cut_ds[0]["input_ids"])
    assert kept.endswith(turns[-1]["content"] + "<|im_end|>") and kept.count("Summarize") < 3
    assert kept.startswith("<|im_start|>system\nBe brief.<|im_end|>")  # the system turn stays
    assert len(cut_ds[0]["input_ids"]) <= limit
    with pytest.raises(UserError, match="no usable rows: 0 empty, 1 with targets longer"):
        build_examples([long], tokenizer, CHAT, CHAT_PROMPT, TrainRecipe(max_length=20), False)


@pytest.mark.parametrize("cell, message", [
    ("Hi there", "row 2: column 'messages' holds a str"),
    ([{"role": "tool", "content": "42"}], "row 2: turn 1 has the role 'tool'"),
    ([{"role": "user", "content": "hi"}], "row 2: the conversation has no assistant turn"),
    ([{"role": "assistant", "content": "hi"}], "row 2: turn 1 is an assistant turn before any user turn"),
])
def test_a_bad_conversation_is_refused_naming_its_row(tmp_path, cell, message):
    rows = conversations(2, seed=8)
    rows[1]["messages"] = cell
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if isinstance(cell, str):  # one string among lists: datasets cannot read the column; alone it can
        path.write_text(json.dumps(rows[0] | {"messages": "Hello"}) + "\n" + json.dumps(rows[1]) + "\n")
        message = message.replace("row 2", "row 1")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_splits(DataRecipe(train=str(path), format="messages"), CHAT_PROMPT)


def test_messages_train_on_a_tiny_chat_model_and_evaluate_the_last_answer(tmp_path, tiny_chat, chat_data, capsys):
    path = tmp_path / "r.toml"
    text = recipe_text(tiny_chat, chat_data, tmp_path / "runs", data='format = "messages"', eval="max_new_tokens = 12")
    path.write_text(text.replace("enabled = false", "max_samples = 4").replace("max_length = 128", "max_length = 256")
                    .replace("max_steps = 12", "max_steps = 40")
                    .replace('template = "Summarize:\\n{dialogue}\\nSummary: "', ""))
    assert main(["run", str(path)]) == 0
    rd = RunDir(tmp_path / "runs" / "t")
    losses = [loss for _, loss in rd.losses()]
    assert losses[-1] < losses[0] - 0.5  # from ln(400) = 5.99: a random model with a byte-level 400-token vocabulary
    evaluation = json.loads(rd.eval_json().read_text())
    test_rows = conversations(6, seed=3)
    samples = rd.samples().read_text()
    assert test_rows[0]["messages"][-1]["content"] in samples  # the reference is the last assistant turn
    assert evaluation["n"] == 4
    assert "conversations in messages, loss on all assistant turns" in rd.report.read_text()


def test_a_tokenizer_without_a_chat_template_is_refused_for_messages(tmp_path, tiny_llama, chat_data, capsys):
    path = tmp_path / "r.toml"
    path.write_text(recipe_text(tiny_llama, chat_data, tmp_path / "runs", data='format = "messages"')
                    .replace('template = "Summarize:\\n{dialogue}\\nSummary: "', ""))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert 'data.format = "messages"' in err and "has none" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "t").exists()


def test_prompt_completion_trains(tmp_path, tiny_llama):
    data = tmp_path / "pc"
    data.mkdir()
    for name, seed, n in (("train", 1, 48), ("test", 3, 4)):
        write_jsonl(data / f"{name}.jsonl", [{"prompt": "Summarize:\n" + r["dialogue"] + "\nSummary: ",
                                              "completion": r["summary"]} for r in make_rows(n, seed)])
    path = tmp_path / "r.toml"
    text = recipe_text(tiny_llama, data, tmp_path / "runs", data='format = "prompt_completion"')
    path.write_text(text.replace(f'eval = "{data}/validation.jsonl"\n', "").replace(
        'template = "Summarize:\\n{dialogue}\\nSummary: "', ""))
    recipe = load_recipe(path)
    assert (recipe.data.input_column, recipe.data.target_column, recipe.prompt.template) == (
        "prompt", "completion", "{prompt}")
    assert main(["run", str(path)]) == 0
    losses = [loss for _, loss in RunDir(tmp_path / "runs" / "t").losses()]
    assert losses[-1] < losses[0] - 0.3, losses
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    row = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    example = build_examples([row], tokenizer, recipe.data, recipe.prompt, recipe.train, False)[0][0]
    completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    learned = [label for label in example["labels"] if label != IGNORE_INDEX]
    assert learned == completion and example["input_ids"][-len(completion):] == completion


# ---------------------------------------------------------------- mixing


def mix_recipe(tmp_path, model, data_dir, weight=0.25, seed=42, extra=""):
    replay = tmp_path / "replay"
    replay.mkdir(exist_ok=True)
    write_jsonl(replay / "train.jsonl", [{"prompt": f"Repeat: word{i}", "completion": f"word{i}"} for i in range(40)])
    write_jsonl(replay / "validation.jsonl", [{"prompt": f"Repeat: w{i}", "completion": f"w{i}"} for i in range(6)])
    path = tmp_path / "r.toml"
    path.write_text(recipe_text(model, data_dir, tmp_path / "runs", train=f"seed = {seed}")
                    + f'\n[[data.mix]]\ntrain = "{replay}/train.jsonl"\neval = "{replay}/validation.jsonl"\n'
                      f'format = "prompt_completion"\nweight = {weight}\n{extra}')
    return path


def draw(path, tokenizer, **overrides):
    recipe = load_recipe(path, [f"{k}={v}" for k, v in overrides.items()])
    splits = load_splits(recipe.data, recipe.prompt)
    main_ds, _ = build_examples(splits["train"], tokenizer, recipe.data, recipe.prompt, recipe.train, False)
    return data_stage.mix_examples(main_ds, data_stage.load_mix(recipe.data, recipe.prompt), tokenizer, recipe.data,
                                   recipe.prompt, recipe.train, False, recipe.train.seed)


def test_mixing_draws_the_weights_asked_reproducibly_for_a_seed(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    big = tmp_path / "big"
    big.mkdir()
    write_jsonl(big / "train.jsonl", make_rows(600, seed=11))
    for name in ("validation", "test"):
        write_jsonl(big / f"{name}.jsonl", make_rows(4, seed=12))
    path = mix_recipe(tmp_path, tiny_llama, big, weight=0.2)
    mixed, stats, evals = draw(path, tokenizer)
    main_rows, replay_rows = stats[0].rows, stats[1].rows
    assert main_rows == 600  # one pass over the main task ...
    assert abs(replay_rows / (main_rows + replay_rows) - 0.2) < 0.03  # ... and the replay at its weight
    assert stats[1].rows > stats[1].available == 40  # 40 replay rows for ~150 draws: repeated, and said so
    assert len(mixed) == main_rows + replay_rows and set(evals) == {"data.mix[1]"}
    again, _, _ = draw(path, tokenizer)
    assert again["input_ids"] == mixed["input_ids"]
    other, _, _ = draw(path, tokenizer, **{"train.seed": 7})
    assert other["input_ids"] != mixed["input_ids"]


def test_a_mixed_run_records_rows_and_eval_loss_per_source(tmp_path, tiny_llama, tiny_data, capsys):
    path = mix_recipe(tmp_path, tiny_llama, tiny_data)
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "data.mix[1]:" in out and "asked 25%" in out
    result = read_json(RunDir(tmp_path / "runs" / "t").result)
    rows = result["rows_per_source"]
    assert rows["data"] == 64 and 10 <= rows["data.mix[1]"] <= 35
    assert set(result["eval_loss_per_source"]) == {"data", "data.mix[1]"}
    assert all(loss > 0 for loss in result["eval_loss_per_source"].values())


@pytest.mark.parametrize("extra, message", [
    ('\n[[data.mix]]\ntrain = "more.jsonl"\nweight = 0.9', "data.mix: the weights sum to 1.15"),
    ('input_column = "question"', 'data.mix[1].input_column: not used with data.mix[1].format = "prompt_completion"'),
])
def test_bad_mixes_are_refused_before_loading(tmp_path, tiny_llama, tiny_data, capsys, extra, message):
    (tmp_path / "more.jsonl").write_text('{"dialogue": "a", "summary": "b"}\n')
    path = mix_recipe(tmp_path, tiny_llama, tiny_data, extra=extra)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_mix_source_without_the_columns_is_refused_naming_it(tmp_path, tiny_llama, tiny_data, capsys):
    path = mix_recipe(tmp_path, tiny_llama, tiny_data)
    path.write_text(path.read_text().replace('format = "prompt_completion"', 'input_column = "question"\n'
                                                                               'target_column = "answer"'))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "data.mix[1].train" in err and "no column 'question', 'answer'" in err
    assert not (tmp_path / "runs" / "t").exists()


def test_format_keys_it_does_not_use_are_refused_and_a_resolved_mix_reads_back(tmp_path):
    from qlora_lite.recipe import RecipeError, recipe_from_dict, recipe_to_toml

    (tmp_path / "t.jsonl").write_text('{"messages": []}\n')
    base = {"name": "x", "model": {"name": "m"}, "eval": {"enabled": False},
            "data": {"train": "t.jsonl", "format": "messages"}}
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(base | {"prompt": {"chat_template": False, "template": "Q: {dialogue}"}}, base_dir=tmp_path)
    assert "prompt.chat_template = false with data.format = \"messages\"" in str(e.value)
    assert "prompt.template: not used with data.format = \"messages\"" in str(e.value)
    mixed = base | {"data": base["data"] | {"mix": [{"train": "t.jsonl", "weight": 0.3, "format": "messages"},
                                                    {"train": "t.jsonl", "weight": 0.1, "input_column": "q",
                                                     "target_column": "a"}]}}
    recipe = recipe_from_dict(mixed, base_dir=tmp_path)
    assert [m.template for m in recipe.data.mix] == ["{messages}", "{q}"]
    assert recipe.data.main_weight == pytest.approx(0.6)
    (tmp_path / "resolved.toml").write_text(recipe_to_toml(recipe))
    assert load_recipe(tmp_path / "resolved.toml") == recipe


def test_few_shot_examples_of_conversations_are_earlier_turns_after_the_system_turn(tokenizer):
    rows = conversations(3, seed=9)
    row, example = rows[0], rows[1]  # row 0 has a system turn, row 1 none
    shot = (example, data_stage.target_text(example, CHAT))
    ids, cut = encode_prompt(row, CHAT, CHAT_PROMPT, tokenizer, 1000, shots=[shot])
    text = tokenizer.decode(ids)
    shown = [t for t in example["messages"] if t["role"] != "system"]
    expected = tokenizer.apply_chat_template([row["messages"][0], *shown, *row["messages"][1:-1]], tokenize=False,
                                             add_generation_prompt=True)
    assert not cut and text == expected
    short, cut = encode_prompt(row, CHAT, CHAT_PROMPT, tokenizer, len(ids) - 1, shots=[shot])
    assert cut and example["messages"][0]["content"] not in tokenizer.decode(short)  # the example went first
