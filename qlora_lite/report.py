"""Stage 7: render a finished run directory as report.md with two charts. It reads files, it probes nothing.

Inputs: run_dir/recipe.toml, metrics.jsonl, eval.json, samples.md, memory_report.json (each optional but the
recipe). Outputs: report.md, loss.png (training loss per step) and rouge.png (base vs tuned). A missing or
unreadable piece becomes one line saying so, never an error: a run killed mid-write leaves half a line at the end
of metrics.jsonl, or a truncated JSON file, and the rest is still worth reporting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from qlora_lite.errors import UserError, error_line
from qlora_lite.recipe import Recipe, load_recipe

SAMPLES_SHOWN = 3
METRICS_SHOWN = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu")


def write_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.md (and its PNGs); returns its path."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.toml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no recipe.toml); give <output.dir>/<name> of a run")
    recipe = load_recipe(run_dir / "recipe.toml", files_must_exist=False)
    lines = [f"# Run report: {recipe.name}", "", "## Recipe", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in recipe_summary(recipe)]
    lines += ["", "## Training", "", *training_section(run_dir), "", "## Evaluation", "", *evaluation_section(run_dir)]
    lines += ["", "## Memory", "", *memory_section(run_dir), "", "## Samples", "", *samples_section(run_dir), ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def recipe_summary(recipe: Recipe) -> list[tuple[str, str]]:
    """(what, value) rows describing a run's recipe; the report and the model card show them."""
    q, lora, train, data = recipe.quantization, recipe.lora, recipe.train, recipe.data
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    length = (f"decoder-only: {train.max_length} tokens; encoder-decoder: source {train.max_source_length}, "
              f"target {train.max_target_length}")
    schedule = f"{train.max_steps} steps" if train.max_steps is not None else f"{train.epochs or 1.0} epochs"
    splits = ", ".join(f"{s}: {Path(v).name if '/' in v else v}" for s in ("train", "eval", "test")
                       if (v := getattr(data, s)) is not None)
    return [
        ("base model", f"`{recipe.model.name}`" + (f" ({recipe.model.gguf_file})" if recipe.model.gguf_file else "")),
        ("method", method_summary(recipe)),
        ("quantization", f"4-bit {q.quant_type}, double quant {'on' if q.double_quant else 'off'}, compute "
                         f"{q.compute_dtype}" if recipe.load_in_4bit
                         else f"none (16/32-bit base, compute {q.compute_dtype})"),
        ("LoRA", f"r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, targets {targets}"
                 if recipe.method.kind in ("qlora", "lora") else "not used"),
        ("training", f"{schedule}, micro-batch {train.micro_batch_size} x {train.gradient_accumulation_steps} "
                     f"accumulation, lr {train.learning_rate:g} {train.lr_scheduler}, seed {train.seed}"),
        ("lengths", length),
        ("data", f"{data.source + ': ' if data.source else ''}{splits}; {data.input_column} -> {data.target_column}"),
        ("prompt", "`" + recipe.prompt.template.replace("\n", "\\n").replace("|", "\\|") + "`"
                   + (" in the chat template" if recipe.prompt.chat_template else "")),
    ]


def method_summary(recipe: Recipe) -> str:
    kind = recipe.method.kind
    if kind == "prompt_tuning":
        return f"prompt tuning, {recipe.method.num_virtual_tokens} virtual tokens"
    return {"qlora": "QLoRA (LoRA on a 4-bit base)", "lora": "LoRA on a 16-bit base",
            "full": "full fine-tuning (every weight, fp32 master weights)"}[kind]


def metrics_table(report: dict) -> list[str]:
    """Markdown rows of eval.json's base and tuned metrics, in percent."""
    keys = shown_metrics(report)
    lines = [f"{report.get('n', '?')} examples of the {report.get('split', '?')} split.", "",
             "| | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for model in ("base", "tuned"):
        lines.append(f"| {model} | " + " | ".join(f"{100 * report[model][k]:.2f}" for k in keys) + " |")
    return lines


def shown_metrics(report: dict) -> list[str]:
    """The metrics of METRICS_SHOWN both models have a number for: a damaged eval.json must not break the table."""
    return [k for k in METRICS_SHOWN if all(isinstance(report[m].get(k), (int, float)) for m in ("base", "tuned"))]


# ---------------------------------------------------------------- reading run files


def read_json(path: Path) -> dict:
    """A file holding one JSON object; ValueError (or OSError) when it does not."""
    value = json.loads(path.read_bytes())
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value


def read_eval_json(path: Path) -> dict:
    """eval.json with the base and tuned scores the tables need; ValueError (or OSError) when it lacks them."""
    report = read_json(path)
    if not all(isinstance(report.get(m), dict) for m in ("base", "tuned")):
        raise ValueError("no base and tuned scores")
    return report


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(the JSON objects of a JSON Lines file, how many non-blank lines are not one): a run killed while writing
    leaves half a line, which must not cost the lines before it."""
    rows = [json_or_none(line) for line in path.read_bytes().splitlines() if line.strip()]
    kept = [row for row in rows if isinstance(row, dict)]
    return kept, len(rows) - len(kept)


def json_or_none(line: bytes):
    try:
        return json.loads(line)
    except ValueError:  # not JSON, or not UTF-8
        return None


def append_jsonl(path: Path, row: dict) -> None:
    """One JSON line at the end of a run's log; after a half-written last line (a run killed while writing), on a
    line of its own, so the first row of a resumed run is not glued to it and lost."""
    with path.open("a+b") as f:
        broken = f.tell() > 0 and (f.seek(-1, 2), f.read(1))[1] != b"\n"
        f.write(b"\n" * broken + json.dumps(row).encode() + b"\n")


def keep_jsonl_rows(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite a run's log with the rows `keep` accepts (half-written lines dropped), atomically."""
    if not path.is_file():
        return
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(b"".join(json.dumps(row).encode() + b"\n" for row in read_jsonl(path)[0] if keep(row)))
    partial.replace(path)


# ---------------------------------------------------------------- sections


def training_section(run_dir: Path) -> list[str]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return ["No metrics.jsonl: training has not logged a step."]
    rows, skipped = read_jsonl(path)
    rows = [r for r in rows if "step" in r]
    note = [f"Skipped {skipped} unreadable line(s) of metrics.jsonl (not a JSON object: a run stopped while "
            f"writing leaves half a line).", ""] if skipped else []
    # A resumed run logs some steps again: the later line wins.
    steps = sorted({r["step"]: r["loss"] for r in rows if "loss" in r and r.get("event") != "end"}.items())
    if not steps:
        return [*note, "metrics.jsonl has no training loss yet."]
    evals = sorted({r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}.items())
    plot_lines(run_dir / "loss.png", {"train loss": steps, **({"eval loss": evals} if evals else {})},
               xlabel="step", ylabel="loss")
    if not (run_dir / "result.json").is_file():  # written when training completes
        note += [f"**Training has not finished**: the last logged step is {steps[-1][0]}; the recipe's schedule "
                 f"above is what it was meant to train (continue it with `run RECIPE --resume`).", ""]
    return [*note, f"Loss {steps[0][1]:.4f} at step {steps[0][0]}, {steps[-1][1]:.4f} at step {steps[-1][0]}.", "",
            "![training loss](loss.png)"]


def evaluation_section(run_dir: Path) -> list[str]:
    path = run_dir / "eval.json"
    if not path.is_file():
        return ["No eval.json: the run has not been evaluated (`python -m qlora_lite eval RUN_DIR`)."]
    try:
        report = read_eval_json(path)
    except (OSError, ValueError) as e:
        return [f"eval.json cannot be read ({error_line(e)}): re-run `python -m qlora_lite eval {run_dir}`."]
    keys = shown_metrics(report)
    plot_bars(run_dir / "rouge.png", keys, {m: [100 * report[m][k] for k in keys] for m in ("base", "tuned")})
    lines = metrics_table(report) + ["", "![base vs tuned](rouge.png)"]
    if report.get("in_train"):
        lines += ["", f"**{report['in_train']} of the {report.get('n')} held-out examples also appear in the training "
                      f"data** (the same input text): their scores measure memory, not generalization."]
    generation = report.get("generation")
    if generation:
        lines += ["", "Generation: " + ", ".join(f"{k} {v}" for k, v in generation.items()) + "."]
    if report.get("forgetting"):
        f = report["forgetting"]
        lines += ["", f"Forgetting on `{f['source']}` ({f['tokens']} tokens): loss {f['base_loss']:.4f} -> "
                      f"{f['tuned_loss']:.4f}, perplexity {f['base_perplexity']:.2f} -> {f['tuned_perplexity']:.2f} "
                      f"({f['perplexity_change_pct']:+.1f}%)."]
    return lines


def memory_section(run_dir: Path) -> list[str]:
    path = run_dir / "memory_report.json"
    if not path.is_file():
        return ["No memory_report.json in the run directory."]
    try:
        memory = read_json(path)
    except (OSError, ValueError) as e:
        return [f"memory_report.json cannot be read ({error_line(e)}); only training writes it, so this run's "
                f"memory summary is lost (memory.jsonl keeps the measurements of each logged step)."]
    found = []
    if isinstance(memory.get("peak_gib"), (int, float)):
        found.append(f"peak {memory['peak_gib']:.2f} GiB ({memory.get('peak_source', 'measured')})")
    if isinstance(rss := memory.get("measured", {}).get("rss_peak_gib"), (int, float)):
        found.append(f"process RSS {rss:.2f} GiB (host memory)")
    if isinstance(memory.get("budget_gib"), (int, float)):
        found.append(f"budget {memory['budget_gib']:.2f} GiB, headroom {memory.get('headroom_gib') or 0:.2f} GiB")
    if not found:
        return ["memory_report.json has no peak_gib or budget_gib."]
    return [", ".join(found) + ".", "", *[f"Not measured: {m}." for m in memory.get("missing", [])],
            "", "Per component, predicted vs measured: memory_report.md."]


def samples_section(run_dir: Path) -> list[str]:
    path = run_dir / "samples.md"
    if not path.is_file():
        return ["No samples.md: the run has not been evaluated."]
    try:
        examples = path.read_text(encoding="utf-8").split("\n## ")[1 : SAMPLES_SHOWN + 1]
    except (OSError, ValueError) as e:
        return [f"samples.md cannot be read ({error_line(e)}): re-run `python -m qlora_lite eval {run_dir}`."]
    if not examples:
        return ["samples.md has no examples."]
    return [f"The first {len(examples)} (all in samples.md).", ""] + [
        "### " + example.strip() + "\n" for example in examples
    ]


# ---------------------------------------------------------------- charts


def plot_lines(path: Path, series: dict[str, list[tuple[float, float]]], *, xlabel: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points in series.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="." if len(points) < 50 else None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_bars(path: Path, keys: list[str], groups: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(groups)
    for i, (label, values) in enumerate(groups.items()):
        ax.bar([k + (i - (len(groups) - 1) / 2) * width for k in range(len(keys))], values, width, label=label)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_ylabel("score (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
