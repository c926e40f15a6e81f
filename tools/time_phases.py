"""Where the time of one run goes: each phase of `run`, timed from its events, as a table.

    python tools/time_phases.py [RECIPE] [--set section.key=value ...] [--runs N] [--cold] [--json]

RECIPE defaults to recipes/quickstart.toml. Each run trains into a fresh folder under a temporary output.dir
(deleted afterwards), so nothing of yours is touched. --cold gives each run an empty cache (QLORA_LITE_CACHE), as
on a new machine: the GGUF conversion, the plan's skeleton and the base model's evaluation are all computed;
without it, runs after the first reuse them. With --runs N the table shows each run and the median. The
phases follow the order of run.py: recipe and plan; data, model load and adapter; trainer set-up and training;
evaluation (base and tuned generation and the forgetting probe, from eval.json's own timing); merge and its check;
the report. Time is wall time on this machine: run it with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_lite import events  # noqa: E402
from qlora_lite.rundir import RunDir, read_json  # noqa: E402

PHASES = ("start, recipe, plan", "data, model load, adapter", "trainer set-up", "training", "evaluation",
          "  of which base", "  of which tuned", "merge and check", "report", "total")


def time_one_run(recipe_path: str, overrides: list[str], out_dir: Path, cold: bool) -> dict[str, float]:
    """Seconds per phase of one run (and the run's ROUGE-L before and after, in percent)."""
    if cold:
        os.environ["QLORA_LITE_CACHE"] = str(out_dir / "cache")
    from qlora_lite.cli import quiet_libraries, work_offline_without_network
    from qlora_lite.recipe import load_recipe

    work_offline_without_network()  # as the CLI does, before transformers is imported
    quiet_libraries(debug=False)
    from qlora_lite.run import run
    started = time.monotonic()
    stamps: dict[type, float] = {}

    def notify(event):
        stamps.setdefault(type(event), time.monotonic() - started)  # the first of each kind

    recipe = load_recipe(recipe_path, [*overrides, f"output.dir={out_dir}"])
    result = run(recipe, notify=notify)
    total = time.monotonic() - started
    at = lambda kind, default=None: stamps.get(kind, default)  # noqa: E731
    phases = {
        "start, recipe, plan": at(events.Planned),
        "data, model load, adapter": at(events.SetUp) - at(events.Planned),
        "trainer set-up": at(events.TrainingStarted) - at(events.SetUp),
        "training": at(events.Trained) - at(events.TrainingStarted),
    }
    last = at(events.Trained)
    if events.Evaluated in stamps:
        phases["evaluation"] = at(events.Evaluated) - at(events.Evaluating)
        seconds = read_json(RunDir(result.run_dir).eval_json())["seconds"]
        phases["  of which base"], phases["  of which tuned"] = seconds["base"], seconds["tuned"]
        phases["base from the cache"] = float(result.evaluation.base_from_cache)
        last = at(events.Evaluated)
    if events.Merged in stamps:
        phases["merge and check"] = at(events.Merged) - at(events.Merging)
        last = at(events.Merged)
    phases["report"] = total - last
    phases["total"] = total
    if result.evaluation is not None:
        phases["ROUGE-L base %"] = 100 * result.evaluation.base["rougeL"]
        phases["ROUGE-L tuned %"] = 100 * result.evaluation.tuned["rougeL"]
    return phases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default=str(Path(__file__).resolve().parents[1] / "recipes/quickstart.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--cold", action="store_true", help="an empty cache for each run, as on a new machine")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="time-phases-") as tmp:
        for i in range(args.runs):
            runs.append(time_one_run(args.recipe, args.overrides, Path(tmp) / f"run{i}", args.cold))
            print(f"run {i + 1}/{args.runs}: {runs[-1]['total']:.1f} s", file=sys.stderr, flush=True)
    rows = [k for k in (*PHASES, "ROUGE-L base %", "ROUGE-L tuned %", "base from the cache")
            if any(k in r for r in runs)]
    median = {k: statistics.median(r[k] for r in runs if k in r) for k in rows}
    if args.json:
        print(json.dumps({"runs": runs, "median": median}, indent=2))
        return 0
    heads = [f"run {i + 1}" for i in range(len(runs))] + (["median"] if len(runs) > 1 else [])
    print(f"{'phase (seconds)':<28}" + "".join(f"{h:>10}" for h in heads) + f"{'% of total':>12}")
    for k in rows:
        values = [r.get(k) for r in runs] + ([median[k]] if len(runs) > 1 else [])
        share = f"{100 * median[k] / median['total']:>11.0f}%" if k in PHASES and k != "total" else ""
        print(f"{k:<28}" + "".join("-".rjust(10) if v is None else f"{v:>10.1f}" for v in values) + share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
