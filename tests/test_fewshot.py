"""Few-shot baselines (eval.shots): which training examples each held-out prompt shows, how they are rendered and
cut to fit, the shots block of eval.json, the eval table and the report, its cache, and each bad input's error."""

import json

import pytest
from rich.console import Console

from conftest import make_rows, recipe_text
from qlora_lite import fewshot, report
from qlora_lite import model as model_stage
from qlora_lite.cli import eval_table, main
from qlora_lite.data import SHOT_DELIMITER, render_prompt
from qlora_lite.errors import UserError
from qlora_lite.evaluate import evaluate_run
from qlora_lite.recipe import RecipeError, load_recipe
from test_evaluate import make_run

HEADER = "Summarize:\n"  # the start of every rendered example and prompt of recipe_text's template


@pytest.fixture()
def setup(tmp_path, tiny_llama, tiny_data):
    """(recipe path, tokenizer, held-out rows, training rows)."""
    path = tmp_path / "r.toml"
    path.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", name="r"))
    tokenizer = model_stage.load_tokenizer(str(tiny_llama))
    return path, tokenizer, make_rows(6, seed=3), make_rows(40, seed=1)


def prompt_texts(path, tokenizer, rows, train_rows, overrides=(), limit=10_000):
    """{k: each row's k-shot prompt, decoded} for eval.shots = [1, 3] (and `overrides`), and the prompt sets."""
    recipe = load_recipe(path, ["eval.shots=[0, 1, 3]", *overrides])
    sets, drawn = fewshot.prompt_sets(rows, train_rows, recipe, tokenizer, limit=limit, encoder=False)
    return {k: [tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]
            for k, (prompts, _, _) in sets.items()}, sets, drawn


def examples_part(text: str) -> str:
    return text[: text.rfind(HEADER)]


def test_k_shot_prompts_hold_k_training_examples_the_same_for_every_row(setup):
    path, tokenizer, rows, train_rows = setup
    texts, sets, drawn = prompt_texts(path, tokenizer, rows, train_rows)
    assert set(texts) == {1, 3} and len(drawn) == 3
    train_summaries = {r["summary"] for r in train_rows}
    for k, prompts in texts.items():
        assert sets[k][1:] == (0, 0)  # nothing dropped, nothing cut
        for row, text in zip(rows, prompts):
            assert text.count(HEADER) == k + 1 and text.count(SHOT_DELIMITER) == k
            shown = [s for s in train_summaries if s in text]
            assert len(shown) == k  # k training examples, each followed by its target
            assert row["dialogue"] in text[text.rfind(HEADER):]  # the row's own prompt comes last
        assert len({examples_part(t) for t in prompts}) == 1  # the same examples before every row
    assert examples_part(texts[3][0]).startswith(examples_part(texts[1][0]))  # nested: 3-shot begins with 1-shot


def test_the_draw_repeats_with_the_seed_and_changes_with_another(setup):
    path, tokenizer, rows, train_rows = setup
    once, _, drawn = prompt_texts(path, tokenizer, rows, train_rows)
    again, _, drawn_again = prompt_texts(path, tokenizer, rows, train_rows)
    other, _, drawn_other = prompt_texts(path, tokenizer, rows, train_rows, ["train.seed=7"])
    assert once == again and drawn == drawn_again
    assert drawn_other != drawn and examples_part(other[3][0]) != examples_part(once[3][0])


def test_a_row_never_sees_itself_and_still_gets_k_examples(setup):
    path, tokenizer, _, train_rows = setup
    recipe = load_recipe(path, ["eval.shots=[3]"])
    drawn, where = fewshot.draw_examples(train_rows, recipe.data, recipe.train.seed, 3 + 3)
    first = [train_rows[i] for i in where[:3]]  # held-out rows that are the drawn examples themselves
    sets, _ = fewshot.prompt_sets(first, train_rows, recipe, tokenizer, limit=10_000, encoder=False)
    prompts, lost, cut = sets[3]
    assert (lost, cut) == (0, 0)
    for row, ids in zip(first, prompts):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert text.count(row["dialogue"]) == 1 and row["summary"] not in text  # its own answer is never shown
        assert text.count(HEADER) == 4
    assert len({examples_part(tokenizer.decode(p, skip_special_tokens=True)) for p in prompts}) == 3


def test_examples_are_dropped_before_the_input_is_cut(setup):
    path, tokenizer, rows, train_rows = setup
    _, whole, _ = prompt_texts(path, tokenizer, rows, train_rows)
    zero = load_recipe(path)
    one_shot = max(len(p) for p in whole[1][0])
    # Room for one example but not three: every 3-shot prompt drops examples, none is cut.
    texts, sets, _ = prompt_texts(path, tokenizer, rows, train_rows, limit=one_shot)
    prompts, lost, cut = sets[3]
    assert lost == len(rows) and cut == 0 and all(len(p) <= one_shot for p in prompts)
    assert all(1 <= t.count(HEADER) - 1 < 3 for t in texts[3])
    assert all(row["dialogue"] in t for row, t in zip(rows, texts[3]))  # the input whole
    # No room even for the prompt alone: every example dropped, then the input cut, each counted.
    tiny = min(len(fewshot.encode_with_examples(r, [], zero, tokenizer, 10_000, False)[0]) for r in rows) - 3
    _, sets, _ = prompt_texts(path, tokenizer, rows, train_rows, limit=tiny)
    for k in (1, 3):
        prompts, lost, cut = sets[k]
        assert lost == cut == len(rows) and all(len(p) == tiny for p in prompts)


def test_chat_template_shows_examples_as_earlier_turns(setup):
    path, tokenizer, rows, train_rows = setup
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    seen = []
    apply = tokenizer.apply_chat_template
    tokenizer.apply_chat_template = lambda messages, **kw: seen.append(messages) or apply(messages, **kw)
    recipe = load_recipe(path, ["prompt.chat_template=true", 'prompt.system="Be brief."'])
    examples = train_rows[:3]
    for k in (0, 1, 3):
        seen.clear()
        text = render_prompt(rows[0], recipe.prompt, tokenizer, [(ex, ex["summary"]) for ex in examples[:k]])
        (messages,) = seen
        assert len(messages) == 2 * k + 1 + 1  # k user/assistant pairs, the row's own prompt, the system message
        assert [m["role"] for m in messages] == ["system", *["user", "assistant"] * k, "user"]
        assert [m["content"] for m in messages[2::2]] == [ex["summary"] for ex in examples[:k]]
        assert text.count("<|system|>") == 1 and text.endswith("<|assistant|>")


# ---------------------------------------------------------------- in the evaluation


def test_eval_json_table_and_report_show_the_shots(tmp_path, tiny_llama, tiny_data, capsys, monkeypatch):
    recipe, loaded = make_run(tmp_path, tiny_llama, tiny_data, steps=2,
                              overrides=["eval.shots=[0, 1, 3]", "train.max_length=400"])
    result = evaluate_run(loaded, recipe, recipe.run_dir)
    found = json.loads((recipe.run_dir / "eval.json").read_text())
    assert list(found["shots"]) == ["0", "1", "3"] and set(result.shots) == {0, 1, 3}
    assert {k: v for k, v in found["shots"]["0"].items() if k in found["base"]} == found["base"]
    for k in ("1", "3"):
        assert set(found["shots"][k]) == set(found["base"]) | {"rows_lost_examples", "prompts_truncated"}
        assert found["shots"][k]["rows_lost_examples"] == 0
    assert found["fewshot"]["seed"] == recipe.train.seed and len(found["fewshot"]["train_rows"]) == 3
    assert "**Base, 3-shot:**" in (recipe.run_dir / "samples.md").read_text()

    console = Console(record=True, width=200)
    console.print(eval_table(result))
    table = console.export_text()
    assert "base, 1-shot" in table and "base, 3-shot" in table and "base, 0-shot" not in table
    text = report.write_report(recipe.run_dir).read_text()
    assert "| base, 1-shot |" in text and "| base, 3-shot |" in text and "training examples" in text

    # Again: the base and the k-shot outputs from the cache; another seed draws other examples, generated anew.
    again = json.loads((evaluate_run(loaded, recipe, recipe.run_dir).eval_json).read_text())
    assert again["base_from_cache"] and again["fewshot"]["from_cache"] == [1, 3]
    assert again["shots"] == found["shots"]
    reseeded = load_recipe(recipe.run_dir / "recipe.toml", ["train.seed=7"])
    other = json.loads(evaluate_run(loaded, reseeded, recipe.run_dir).eval_json.read_text())
    assert other["base_from_cache"] and other["fewshot"]["from_cache"] == []  # zero-shot: the same prompts
    assert other["fewshot"]["train_rows"] != found["fewshot"]["train_rows"]

    from qlora_lite import cli  # `eval RUN_DIR` of the saved run shows them too

    monkeypatch.setattr(cli.console, "width", 300)
    assert main(["eval", str(recipe.run_dir)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "base, 1-shot" in out and "base, 3-shot" in out and "training examples before each prompt" in out


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("shots, message", [
    ("[0, -1]", "eval.shots: -1 is negative; give numbers of examples, 0 or more"),
    ("[1, 3, 1]", "eval.shots: 1 given more than once; give each k once"),
    ("[0, 9]", "eval.shots: 9 examples, more than the training rows data.max_train_samples = 8 keeps; lower "
               "eval.shots to at most 8"),
    ('["one"]', "eval.shots: list item 'one': expected an integer"),
])
def test_bad_shots_are_refused_by_the_recipe(setup, shots, message):
    path = setup[0]
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(path, [f"eval.shots={shots}", "data.max_train_samples=8"])


def test_more_shots_than_training_rows_is_refused_before_the_model_loads(setup, tmp_path, capsys):
    path = setup[0]
    assert main(["run", str(path), "--set", "eval.enabled=true", "--set", "eval.shots=[0, 65]"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "eval.shots: 65 examples, but data.train" in err and "has 64 usable rows" in err
    assert "Traceback" not in err and not (tmp_path / "runs" / "r").exists()
    with pytest.raises(UserError, match="has 2 usable rows"):
        fewshot.check_shots([3], [{"dialogue": "a", "summary": "b"}, {"dialogue": "c", "summary": "d"},
                                  {"dialogue": " ", "summary": "e"}], load_recipe(path).data)


def test_compare_shows_shot_rows_once_per_base():
    from qlora_lite.compare import table_rows

    def method(base_model, rouge_l, shots):
        scores = {"rouge1": 0.3, "rouge2": 0.1, "rougeL": rouge_l, "rougeLsum": 0.3}
        return {"measured_peak_gib": None, "cpu_rss_peak_gib": 1.0, "forgetting_perplexity_change_pct": None,
                "trainable_params": 10, "trainable_pct": 1.0, "predicted_peak_gib": 1.0, "seconds_per_step": 1.0,
                "tokens_per_s": 100, "stored_bytes": 1000, **scores, "rougeL_gain": 0.05,
                "base": {**scores, "rougeL": 0.2}, "shots": shots, "base_model": base_model}

    shots = {"1": {"rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.25, "rougeLsum": 0.3}}
    header, rows = table_rows({"qlora": method("4-bit base", 0.3, shots), "ia3": method("4-bit base", 0.28, shots),
                               "lora": method("16-bit base", 0.31, shots)})
    labels = [row[0] for row in rows]
    assert labels[-4:] == ["4-bit base, 0-shot", "4-bit base, 1-shot", "16-bit base, 0-shot", "16-bit base, 1-shot"]
    one_shot = rows[labels.index("4-bit base, 1-shot")]
    assert len(one_shot) == len(header) and one_shot[2] == "0 (no training)" and one_shot[-2] == "+5.00"
    assert [row[0] for row in table_rows({"qlora": method("4-bit base", 0.3, {})})[1]] == ["qlora"]
