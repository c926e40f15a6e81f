"""The run report: every section from a complete run directory, and one line instead of a crash for each
missing piece."""

import json

from conftest import recipe_text
from qlora_lite.recipe import load_recipe, recipe_to_toml
from qlora_lite.report import write_report

PNG = b"\x89PNG"


def run_dir_with_recipe(tmp_path, tiny_llama, tiny_data):
    path = tmp_path / "r.toml"
    path.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", name="r"))
    recipe = load_recipe(path)
    recipe.run_dir.mkdir(parents=True)
    (recipe.run_dir / "recipe.toml").write_text(recipe_to_toml(recipe))
    return recipe.run_dir


def test_report_with_every_piece(tmp_path, tiny_llama, tiny_data):
    run_dir = run_dir_with_recipe(tmp_path, tiny_llama, tiny_data)
    lines = [{"step": s, "loss": 6.0 - 0.3 * s, "learning_rate": 5e-3} for s in range(1, 11)]
    lines += [{"step": 5, "eval_loss": 4.9}, {"step": 10, "train_loss": 4.8, "event": "end"}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run_dir / "eval.json").write_text(json.dumps({
        "base": dict(rouge1=0.1, rouge2=0.02, rougeL=0.09, rougeLsum=0.1),
        "tuned": dict(rouge1=0.45, rouge2=0.2, rougeL=0.4, rougeLsum=0.42), "n": 5, "split": "test",
        "generation": {"max_new_tokens": 24, "do_sample": False},
        "forgetting": dict(source="general.txt", chunks=2, tokens=250, base_loss=5.0, tuned_loss=5.1,
                           base_perplexity=148.4, tuned_perplexity=164.0, loss_change=0.1, perplexity_change_pct=10.5),
    }))
    examples = "".join(f"## Example {i}\n\n**Reference:** ref {i}\n\n**Base:** b\n\n**Tuned:** t {i}\n\n"
                       for i in range(1, 6))
    (run_dir / "samples.md").write_text("# Samples\n\n" + examples)
    (run_dir / "memory_report.json").write_text(json.dumps({
        "peak_gib": 3.25, "peak_source": "predicted", "budget_gib": 12.0, "headroom_gib": 8.75,
        "measured": {"rss_peak_gib": 4.07}, "missing": ["GPU memory: training on CPU"], "other": 1}))

    path = write_report(run_dir)
    text = path.read_text()
    assert path == run_dir / "report.md"
    assert (run_dir / "loss.png").read_bytes()[:4] == PNG and (run_dir / "rouge.png").read_bytes()[:4] == PNG
    assert "![training loss](loss.png)" in text and "![base vs tuned](rouge.png)" in text
    assert "Loss 5.7000 at step 1, 3.0000 at step 10." in text
    assert "| tuned | 45.00 | 20.00 | 40.00 | 42.00 |" in text
    assert "peak 3.25 GiB (predicted), process RSS 4.07 GiB (host memory), budget 12.00 GiB, headroom 8.75 GiB." in text
    assert "Not measured: GPU memory: training on CPU." in text
    assert "perplexity 148.40 -> 164.00 (+10.5%)" in text
    assert "r 8, alpha 16" in text and "12 steps" in text
    assert "ref 3" in text and "ref 4" not in text  # the first three samples only


def test_report_skips_what_is_missing(tmp_path, tiny_llama, tiny_data):
    run_dir = run_dir_with_recipe(tmp_path, tiny_llama, tiny_data)
    text = write_report(run_dir).read_text()
    for line in ("No metrics.jsonl", "No eval.json", "No memory_report.json", "No samples.md"):
        assert line in text
    assert not (run_dir / "loss.png").exists() and not (run_dir / "rouge.png").exists()
    (run_dir / "metrics.jsonl").write_text("")
    (run_dir / "memory_report.json").write_text("{}")
    text = write_report(run_dir).read_text()
    assert "no training loss yet" in text and "has no peak_gib or budget_gib" in text


def test_a_half_written_log_line_costs_neither_the_rows_before_nor_the_next_one(tmp_path):
    from qlora_lite.rundir import RunDir, append_jsonl

    for name in ("metrics.jsonl", "memory.jsonl"):
        (tmp_path / name).write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed while writing
        append_jsonl(tmp_path / name, {"step": 2, "loss": 1.5})  # the resumed run's first row
    assert RunDir(tmp_path).metrics_rows() == RunDir(tmp_path).memory_samples() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
