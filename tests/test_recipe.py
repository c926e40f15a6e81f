"""Recipe validation: one test per rule, the override syntax, the resolved TOML round trip, every shipped recipe."""

from pathlib import Path

import pytest

from qlora_lite.recipe import RecipeError, load_recipe, recipe_from_dict, recipe_to_toml, reference

ROOT = Path(__file__).resolve().parents[1]
BASE = {"name": "r", "model": {"name": "some/model"}, "data": {"source": "some/dataset", "test": "test"}}


def problems(raw: dict, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(raw, overrides)
    return e.value.problems


def with_(section: str, **values) -> dict:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    raw.setdefault(section, {}).update(values)
    return raw


def test_minimal_recipe_gets_defaults():
    recipe = recipe_from_dict(BASE)
    assert recipe.quantization.quant_type == "nf4" and recipe.quantization.double_quant
    assert recipe.lora.target_modules == "all-linear"
    assert recipe.run_dir == Path("runs/r")


def test_unknown_key_names_it_with_hint():
    (p,) = problems(with_("lora", rank=8))
    assert "lora.rank" in p and "did you mean lora.r?" in p


def test_unknown_section_names_it_with_hint():
    raw = dict(BASE, trian={"max_steps": 3})
    (p,) = problems(raw)
    assert "[trian]" in p and "did you mean train?" in p


def test_wrong_type_names_key_and_expected_type():
    (p,) = problems(with_("train", micro_batch_size="4"))
    assert p.startswith("train.micro_batch_size:") and "integer" in p


def test_bool_is_not_an_integer():
    (p,) = problems(with_("lora", r=True))
    assert "lora.r" in p


def test_out_of_range_value():
    (p,) = problems(with_("lora", r=0))
    assert "lora.r" in p and "[1, 1024]" in p


def test_choice_with_hint():
    (p,) = problems(with_("quantization", quant_type="nf5"))
    assert "quantization.quant_type" in p and "'nf4'" in p and "did you mean nf4?" in p


def test_every_problem_reported_at_once():
    raw = with_("lora", r=0, rank=3)
    raw["train"] = {"optimizer": "sgd"}
    assert len(problems(raw)) == 3


def test_name_must_be_a_directory_name():
    (p,) = problems(dict(BASE, name="../escape"))
    assert p.startswith("name:")


def test_model_name_required():
    (p,) = problems({"name": "r", "data": {"source": "d", "test": "test"}})
    assert "model.name" in p


def test_max_steps_and_epochs_exclusive():
    (p,) = problems(with_("train", max_steps=3, epochs=1.0))
    assert "max_steps or epochs" in p


def test_template_needs_a_placeholder():
    (p,) = problems(with_("prompt", template="Summarize this."))
    assert "prompt.template" in p and "{dialogue}" in p


def test_split_name_needs_a_source():
    (p,) = problems({"name": "r", "model": {"name": "m"}, "data": {"train": "train"}, "eval": {"enabled": False}})
    assert "data.train" in p and "data.source" in p


def test_missing_data_file_names_the_file(tmp_path):
    (p,) = problems({"name": "r", "model": {"name": "m"}, "data": {"train": "nope.jsonl"}, "eval": {"enabled": False}})
    assert "data.train" in p and "nope.jsonl" in p


def test_system_needs_chat_template():
    (p,) = problems(with_("prompt", system="You are terse."))
    assert "prompt.system" in p


def test_budget_card_or_gib_not_both():
    (p,) = problems(with_("budget", gpu="rtx-3060-12gb", gpu_memory_gib=12))
    assert "budget" in p


def test_gguf_file_must_be_gguf():
    (p,) = problems(with_("model", gguf_file="weights.bin"))
    assert "model.gguf_file" in p


def test_overrides_parse_as_toml_or_bare_string():
    recipe = recipe_from_dict(BASE, ["train.max_steps=30", "output.dir=runs2", "lora.target_modules=['q_proj']",
                                     "train.learning_rate=1e-4", "name=other"])
    assert recipe.train.max_steps == 30
    assert recipe.output.dir == "runs2"
    assert recipe.lora.target_modules == ("q_proj",)
    assert recipe.train.learning_rate == 1e-4
    assert recipe.name == "other"


def test_override_of_unknown_key_is_refused():
    (p,) = problems(BASE, ["train.max_step=30"])
    assert "train.max_step" in p and "did you mean train.max_steps?" in p


def test_override_without_equals_is_refused():
    (p,) = problems(BASE, ["train.max_steps"])
    assert "--set" in p


@pytest.mark.parametrize("item", [".max_steps=3", "train.=3", "train..max_steps=3"])
def test_override_with_an_empty_name_is_refused(item):
    (p,) = problems(BASE, [item])  # ".max_steps" read as an unknown section [] (did you mean quantization?)
    assert p.startswith(f"--set {item!r}: expected section.key=value") and "an empty name" in p


def test_malformed_toml_names_the_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\n[model]\nname = "m\n')
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert "not valid TOML" in str(e.value) and "line 3" in str(e.value)


@pytest.mark.parametrize("text", ["[train]\nseed = 1\nseed = 2\n", "[train]\nseed = 1\n[train]\nmax_steps = 2\n"])
def test_a_key_or_section_written_twice_is_named(tmp_path, text):
    path = tmp_path / "twice.toml"
    path.write_text(f'name = "x"\n{text}')
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert "line 4" in str(e.value) and "written twice: keep one" in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="no recipe file"):
        load_recipe(tmp_path / "none.toml")


def test_data_paths_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text('{"dialogue": "a", "summary": "b"}\n')
    (tmp_path / "r.toml").write_text('name = "r"\n[model]\nname = "m"\n[data]\ntrain = "d/train.jsonl"\n'
                                     '[eval]\nenabled = false\n')
    recipe = load_recipe(tmp_path / "r.toml")
    assert recipe.data.train == str(tmp_path / "d" / "train.jsonl")


def test_resolved_toml_round_trips(tmp_path):
    recipe = recipe_from_dict(with_("lora", target_modules=["q_proj", "v_proj"]), ["train.max_steps=7"])
    path = tmp_path / "resolved.toml"
    path.write_text(recipe_to_toml(recipe))
    assert load_recipe(path) == recipe


def test_reference_documents_every_key():
    keys = [k for k, _, _ in reference()]
    assert "train.micro_batch_size" in keys and "lora.target_modules" in keys and len(keys) == len(set(keys))


@pytest.mark.parametrize("path", sorted(ROOT.glob("recipes/**/*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_load_and_start_with_their_command(path):
    load_recipe(path)  # raises RecipeError with every problem
    first = path.read_text().splitlines()[0]
    assert first == f"# python -m qlora_lite run recipes/{path.name}"


def test_evaluation_without_a_held_out_split_is_refused_before_training():
    """eval is on by default: a recipe with only data.train used to train fully, then fail."""
    (p,) = problems({"name": "r", "model": {"name": "m"}, "data": {"source": "d"}})
    assert "data.test or data.eval" in p and "enabled = false" in p
    (p,) = problems(with_("eval", forgetting="missing.txt"))
    assert p.startswith("eval.forgetting: file missing.txt not found")


@pytest.mark.parametrize("section, key, value", [("train", "learning_rate", float("nan")),
                                                 ("lora", "alpha", float("inf")),
                                                 ("budget", "gpu_memory_gib", float("nan")),
                                                 ("train", "epochs", 0.0)])
def test_nan_infinity_and_zero_epochs_are_refused(section, key, value):
    (p,) = problems(with_(section, **{key: value}))
    assert p.startswith(f"{section}.{key}:")


def test_byte_order_mark_is_accepted_and_latin1_is_named(tmp_path):
    text = 'name = "r"\n[model]\nname = "m"\n[data]\nsource = "d"\ntest = "test"\n'
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_recipe(tmp_path / "bom.toml").name == "r"
    (tmp_path / "latin1.toml").write_bytes(("# caf\u00e9\n" + text).encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8 text .byte 0xe9 on line 1.: save the file as UTF-8"):
        load_recipe(tmp_path / "latin1.toml")


def test_key_in_the_wrong_section_or_above_every_section_names_its_section():
    raw = {**with_("train", r=4), "max_steps": 3}
    assert problems(raw) == [
        "unknown top-level key max_steps (max_steps is a key of [train]: write it under that section)",
        "unknown key train.r (r is a key of [lora]: write it under that section)",
    ]


@pytest.mark.parametrize("value, expected", [
    ("q_proj", 'expected "all-linear" or a list of module names, got \'q_proj\'; for one module write ["q_proj"]'),
    ([], "the list is empty"),
])
def test_target_modules_is_all_linear_or_a_list_of_names(value, expected):
    (p,) = problems(with_("lora", target_modules=value))
    assert p.startswith("lora.target_modules: ") and expected in p


@pytest.mark.parametrize("section, values, expected", [
    ("prompt", {"template": "{dialogue} {summary}"}, "prompt.template: uses {summary}, the target column"),
    ("eval", {"split": "eval"}, 'eval.split = "eval" but data.eval is not set'),
    ("train", {"eval_steps": 5}, "train.eval_steps: the eval loss needs data.eval"),
])
def test_settings_that_would_fail_or_mislead_after_training_are_refused_at_load(section, values, expected):
    (p,) = problems(with_(section, **values))
    assert p.startswith(expected)


def test_a_data_folder_or_text_file_is_named_as_such(tmp_path):
    (tmp_path / "dialogues").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    raw = {"name": "r", "model": {"name": "m"}, "data": {"train": "dialogues", "test": "notes.txt"}}
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(raw, base_dir=tmp_path)
    assert e.value.problems == [
        "data.train: dialogues is a folder; set data.source = 'dialogues' and data.train to a split name (a file's "
        "name without its extension), or point it at a file",
        "data.test: notes.txt is not a data file qlora_lite reads; convert it to .jsonl/.json/.csv/.parquet",
    ]


def test_an_empty_recipe_or_a_folder_is_named_as_such(tmp_path):
    (tmp_path / "empty.toml").write_text("\n")
    with pytest.raises(RecipeError, match="the file is empty"):
        load_recipe(tmp_path / "empty.toml")
    (tmp_path / "r.toml").mkdir()
    with pytest.raises(RecipeError, match="is a folder, not a recipe file"):
        load_recipe(tmp_path / "r.toml")
