"""The knowledge probe in the evaluation (eval.knowledge): the recipe key, the run's early check of the file, the
knowledge block of eval.json, its row in the eval table and its line in the report, and the cached base score."""

import json

import pytest
from rich.console import Console

from conftest import recipe_text
from qlora_lite import report
from qlora_lite.cli import eval_table, main
from qlora_lite.evaluate import evaluate_run
from qlora_lite.recipe import RecipeError, load_recipe
from test_evaluate import make_run

QUESTIONS = [
    {"id": "q1", "subject": "places", "question": "Where do trains stop?",
     "choices": ["station", "cake", "noon", "tent"], "answer": "A"},
    {"id": "q2", "subject": "things", "question": "What do you eat?", "choices": ["ladder", "cake", "keys", "map"],
     "answer": "B"},
    {"id": "q3", "question": "When is it dark?", "choices": ["noon", "midnight", "five"], "answer": "midnight"},
    {"id": "q4", "question": "What opens a door?", "choices": ["wine", "books", "keys", "camera"], "answer": "C"},
]


def write_questions(path, questions=QUESTIONS):
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path


def test_eval_json_table_and_report_show_base_and_tuned_accuracy(tmp_path, tiny_llama, tiny_data):
    questions = write_questions(tmp_path / "questions.jsonl")
    recipe, loaded = make_run(tmp_path, tiny_llama, tiny_data, steps=2, overrides=[f'eval.knowledge="{questions}"'])
    result = evaluate_run(loaded, recipe, recipe.run_dir)
    found = json.loads(result.eval_json.read_text())["knowledge"]
    assert found["file"] == str(questions)
    for which, score in zip(("base", "tuned"), result.knowledge):
        assert found[which]["n"] == score.n == 4 and found[which]["accuracy"] == score.accuracy
        assert 0 <= found[which]["ci_low"] <= found[which]["accuracy"] <= found[which]["ci_high"] <= 1
        assert found[which]["chance"] == pytest.approx((3 / 4 + 1 / 3) / 4)
        assert len(found[which]["predictions"]) == 4
    assert found["summary"].startswith("knowledge probe (4 questions):")

    console = Console(record=True, width=200)
    console.print(eval_table(result))
    assert "knowledge: accuracy, 4 questions (chance 27)" in console.export_text()
    text = " ".join(report.write_report(recipe.run_dir).read_text().split())
    assert "Knowledge probe (4 questions):" in text and "95% CI" in text and "1 / the number of choices" in text
    assert "Near-chance accuracy is expected of a small model" in text  # a random tiny model guesses

    # The base model's answers come from the cache the second time; other questions score it again.
    again = evaluate_run(loaded, recipe, recipe.run_dir)
    assert again.base_from_cache and again.knowledge[0] == result.knowledge[0]
    write_questions(questions, [*QUESTIONS[:3], {**QUESTIONS[3], "answer": "D"}])
    assert not evaluate_run(loaded, recipe, recipe.run_dir).base_from_cache


def test_the_file_is_resolved_from_the_recipe_folder_and_a_missing_one_refused(tmp_path, tiny_llama, tiny_data):
    path = tmp_path / "r.toml"
    path.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", name="r"))
    write_questions(tmp_path / "q.jsonl")
    assert load_recipe(path, ['eval.knowledge="q.jsonl"']).eval.knowledge == str(tmp_path / "q.jsonl")
    with pytest.raises(RecipeError, match=r"eval.knowledge: file nope.jsonl not found \(looked in "):
        load_recipe(path, ['eval.knowledge="nope.jsonl"'])


@pytest.mark.parametrize("bad, message", [
    ({"answer": "E"}, "line 2: \"answer\" 'E' is not one of its choices; give a letter A, B, C, D"),
    ({"answer": "pizza"}, "line 2: \"answer\" 'pizza' is not one of its choices"),
    ({"choices": ["cake"]}, 'line 2: "choices" must be a list of between 2 and 10'),
])
def test_a_bad_question_is_refused_before_the_model_loads(bad, message, tmp_path, tiny_llama, tiny_data, capsys):
    path = tmp_path / "r.toml"
    path.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", name="r"))
    write_questions(tmp_path / "q.jsonl", [QUESTIONS[0], {**QUESTIONS[1], **bad}])
    assert main(["run", str(path), "--set", "eval.enabled=true", "--set", 'eval.knowledge="q.jsonl"']) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"eval.knowledge ({tmp_path / 'q.jsonl'}) {message}" in err
    assert "Traceback" not in err and not (tmp_path / "runs" / "r").exists()
