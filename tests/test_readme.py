"""The README documents every recipe key and opens with the two commands a new user runs."""

from pathlib import Path

from qlora_lite.recipe import reference

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_recipe_key_is_in_the_reference_table():
    missing = [key for key, _, _ in reference() if f"| `{key}` |" not in README]
    assert not missing, f"add to README's recipe reference: {missing}"


def test_readme_opens_with_the_quickstart_and_test_commands():
    blocks = [b.split("```", 1)[0].strip() for b in README.split("```bash\n")[1:3]]
    assert blocks[0].endswith("python -m qlora_lite run recipes/quickstart.toml")
    assert blocks[1].endswith("python -m pytest -q")
