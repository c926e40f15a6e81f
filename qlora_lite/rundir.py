"""A run directory, <output.dir>/<name>: the one home of its file names, and the reads and writes of its files.

Other modules ask a `RunDir` for a path or a record and never spell a file name. The layout:

    recipe.toml            the resolved recipe, every default spelled out (eval, merge and report read it back)
    env.json               library versions and the device
    metrics.jsonl          one JSON object per logged step (loss, learning rate, tokens/s)
    memory.jsonl           one memory sample per logged step
    memory_report.json/.md and memory_timeline.png: predicted vs measured memory
    tensorboard/           live curves, with [train] report_to = ["tensorboard"]
    checkpoints/checkpoint-N/   the Trainer's checkpoints, for --resume
    adapter/ or model/     what training saved: a PEFT adapter, or the whole fully fine-tuned model
    result.json            what training did; written when training completes, removed when a resume trains on
    eval.json, samples.md  base vs tuned on the run's held-out split (eval-<split>.json, samples-<split>.md: another)
    report.md, loss.png, rouge.png
    merged/                the merged export, with merge_check.json and a model card (README.md)
    gguf-<type>/           <name>-<type>.gguf made from merged/, gguf_check.json, an Ollama Modelfile, README.md

A comparison of methods lives beside it: <output.dir>/<name>-compare/<method>/ and comparison.json/.md/.png.
Also here: what a run that stopped early kept and how to go on (`interrupted_message`), the checks of saved files
and checkpoints, and the commands that restore a damaged or missing one.
"""

from __future__ import annotations

import json
import pickle
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qlora_lite.errors import UserError, error_line
from qlora_lite.recipe import Recipe, load_recipe, recipe_to_toml
from qlora_lite.source import CONFIG_FILE

ADAPTER, MODEL, CHECKPOINTS, MERGED = "adapter", "model", "checkpoints", "merged"
TRAINED_FOLDERS = (ADAPTER, MODEL, CHECKPOINTS)  # what training saved: never where a merge may write
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names
MODEL_WEIGHTS, MODEL_INDEX = "model.safetensors", "model.safetensors.index.json"  # transformers' file names
TRAINER_STATE, OPTIMIZER, SCHEDULER = "trainer_state.json", "optimizer.pt", "scheduler.pt"  # the Trainer's
CHECKPOINT_STATE = (OPTIMIZER, SCHEDULER, "scaler.pt", TRAINER_STATE, "training_args.bin", "README.md")  # besides
# the weights in a checkpoint: only --resume needs them
FSDP_WEIGHTS, FSDP_OPTIMIZER = "pytorch_model_fsdp_0", "optimizer_0"  # an FSDP checkpoint's shards (accelerate's)
MERGE_CHECK, MODEL_CARD = "merge_check.json", "README.md"  # in a merged export's folder
GGUF_CHECK, MODELFILE = "gguf_check.json", "Modelfile"  # in a GGUF export's folder, with its README.md


def gguf_files(name: str, qtype: str) -> tuple[str, ...]:
    """The files a GGUF export of run `name` writes into its folder: the model first."""
    return f"{name}-{qtype}.gguf", GGUF_CHECK, MODELFILE, MODEL_CARD


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory and the records in it."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------ paths

    @property
    def recipe(self) -> Path:
        return self.path / "recipe.toml"

    @property
    def env(self) -> Path:
        return self.path / "env.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def memory_log(self) -> Path:
        return self.path / "memory.jsonl"

    @property
    def memory_report(self) -> Path:
        return self.path / "memory_report.json"

    @property
    def memory_report_md(self) -> Path:
        return self.path / "memory_report.md"

    @property
    def memory_timeline(self) -> Path:
        return self.path / "memory_timeline.png"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def result(self) -> Path:
        return self.path / "result.json"

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def loss_png(self) -> Path:
        return self.path / "loss.png"

    @property
    def rouge_png(self) -> Path:
        return self.path / "rouge.png"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def merged(self) -> Path:
        return self.path / MERGED

    def gguf(self, qtype: str) -> Path:
        """The folder of the run's GGUF export of this type: one per type, each whole (its Modelfile names its file)."""
        return self.path / f"gguf-{qtype}"

    def eval_json(self, split: str | None = None) -> Path:
        """eval.json of the run's own held-out split; eval-<split>.json of another (so the run's own is kept)."""
        return self.path / (f"eval-{split}.json" if split else "eval.json")

    def samples(self, split: str | None = None) -> Path:
        return self.path / (f"samples-{split}.md" if split else "samples.md")

    def saved_dir(self, has_adapter: bool) -> Path:
        """Where training keeps what it trained: adapter/ (PEFT format), or model/ for full fine-tuning."""
        return self.path / (ADAPTER if has_adapter else MODEL)

    def trained_weights(self) -> Path | None:
        """The adapter/ or model/ folder training saved (its config is there), or None."""
        configs = ((ADAPTER, ADAPTER_CONFIG), (MODEL, CONFIG_FILE))
        return next((self.path / d for d, f in configs if (self.path / d / f).is_file()), None)

    def has_trained_weights(self) -> bool:
        return any((self.path / d).exists() for d in (ADAPTER, MODEL))

    def is_run(self) -> bool:
        return self.recipe.is_file()

    # ------------------------------------------------------------ checkpoints

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / f"checkpoint-{step}"

    def checkpoints(self) -> list[Path]:
        """The run's checkpoints, oldest step first."""
        return sorted(self.checkpoints_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))

    def last_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    # ------------------------------------------------------------ records

    def read_recipe(self) -> Recipe:
        """The saved recipe; its training file may have moved since (eval, merge and report need none)."""
        return load_recipe(self.recipe, files_must_exist=False)

    def write_recipe(self, recipe: Recipe) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.recipe.write_text(recipe_to_toml(recipe))

    def metrics_rows(self) -> list[dict]:
        """metrics.jsonl's rows; a half-written last line (a killed run) skipped."""
        return read_jsonl(self.metrics)[0] if self.metrics.is_file() else []

    def losses(self) -> list[tuple[int, float]]:
        """(step, training loss) of each logged step, in order (the closing summary row is not a step)."""
        return [(r["step"], r["loss"]) for r in self.metrics_rows() if "loss" in r and r.get("event") != "end"]

    def memory_samples(self) -> list[dict]:
        return read_jsonl(self.memory_log)[0] if self.memory_log.is_file() else []

    def keep_logged_steps(self, up_to: int | None) -> None:
        """Drop the log rows of steps after `up_to` (they are trained, and logged, again); None: drop the logs."""
        for log in (self.metrics, self.memory_log):
            if up_to is None:
                log.unlink(missing_ok=True)
            else:
                keep_jsonl_rows(log, lambda row: row.get("step", 0) <= up_to)

    def training_finished(self) -> bool:
        """result.json is written once training completes (and removed when a resumed run trains further)."""
        return self.result.is_file()


# ---------------------------------------------------------------- JSON and JSON Lines


def read_json(path: Path) -> dict:
    """A file holding one JSON object; ValueError (or OSError) when it does not."""
    value = json.loads(path.read_bytes())
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def read_eval_json(path: Path) -> dict:
    """eval.json with the base and tuned scores the tables need; ValueError (or OSError) when it lacks them."""
    report = read_json(path)
    if not all(isinstance(report.get(m), dict) for m in ("base", "tuned")):
        raise ValueError("no base and tuned scores")
    return report


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(the JSON objects of a JSON Lines file, how many non-blank lines are not one): a run killed while writing
    leaves half a line, which must not cost the lines before it."""
    rows = [_json_or_none(line) for line in path.read_bytes().splitlines() if line.strip()]
    kept = [row for row in rows if isinstance(row, dict)]
    return kept, len(rows) - len(kept)


def _json_or_none(line: bytes):
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


# ---------------------------------------------------------------- a comparison's folders


def export_clash(out: Path, run: Path) -> str | None:
    """What `out` (resolved) is to the run directory `run` (resolved) when an export must not write there (it would
    overwrite what training saved, or mix a model into the run's own folder), else None."""
    if out == run:
        return "the run directory"
    if out in run.parents:
        return f"a parent folder of the run directory {run}"
    for name in TRAINED_FOLDERS:
        if out.is_relative_to(run / name):
            return f"{'' if out == run / name else 'inside '}the run's {name}/"
    return None


def compare_dir(recipe: Recipe) -> Path:
    """<output.dir>/<name>-compare: one run directory per method, and the comparison files."""
    return Path(recipe.output.dir) / f"{recipe.name}-compare"


def comparison_files(folder: Path) -> tuple[Path, Path, Path]:
    """comparison.json, comparison.md and comparison.png of a comparison folder."""
    return tuple(folder / f"comparison.{ext}" for ext in ("json", "md", "png"))


# ---------------------------------------------------------------- a finished run, checked


def read_run(run_dir: str | Path) -> Recipe:
    """The recipe of a run that has saved what it trained, its saved files readable; a clear error for anything
    else (eval and merge would otherwise fail deep inside transformers or PEFT)."""
    rd = RunDir(Path(run_dir))
    if not rd.is_run():
        raise UserError(not_a_run(rd))
    saved = rd.trained_weights()
    if saved is None:
        raise UserError(no_weights_message(rd))
    check_saved_files(rd, saved)
    return rd.read_recipe()


def not_a_run(rd: RunDir) -> str:
    return f"{rd} is not a run directory (no {rd.recipe.name}); give <output.dir>/<name> of a run"


def no_weights_message(rd: RunDir) -> str:
    """Why a run has nothing to load, and the way on: its last checkpoint's copy of the weights (a run stopped
    between that checkpoint and the final save, or whose adapter/ was deleted), else finishing the run."""
    last = rd.last_checkpoint()
    if last is None:
        return f"{rd} has no trained weights yet (no {ADAPTER}/ or {MODEL}/); finish the run, or continue it with --resume"
    saved = rd.saved_dir(has_adapter=(last / ADAPTER_CONFIG).is_file())
    step = last.name.split("-")[-1]
    message = (f"{rd} has no trained weights in {saved.name}/ (deleted, or the run stopped before saving them), "
               f"but its last checkpoint {last} has those of step {step}: copy them there with "
               f"`{copy_command(last, saved)}`")
    return message + (", or continue training with --resume" if stopped_early(last) else "")


def check_saved_files(rd: RunDir, saved: Path) -> None:
    """Read every JSON file and weights header training saved, so a damaged one is named with the way to restore
    it; a few milliseconds (safetensors reads headers only)."""
    from safetensors import SafetensorError

    for path in saved_files(saved):
        try:
            read_saved_file(path)
        except FileNotFoundError:
            raise UserError(f"{path} is missing: {restore_hint(rd, saved)}") from None
        except (OSError, ValueError, SafetensorError) as e:
            raise UserError(f"{path} cannot be read ({error_line(e)}); it may be damaged: "
                            f"{restore_hint(rd, saved)}") from None


def saved_files(saved: Path):
    """The JSON files first (configs, tokenizer, the shard index), then the weights files."""
    yield from sorted(saved.glob("*.json"))
    index = saved / MODEL_INDEX
    if saved.name == ADAPTER:
        yield saved / ADAPTER_WEIGHTS
    elif index.is_file():
        yield from (saved / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values())))
    else:
        yield saved / MODEL_WEIGHTS


def read_saved_file(path: Path) -> None:
    """Parse a JSON file, or open a safetensors file's header; raise what the parser raises."""
    from safetensors import safe_open

    if path.suffix == ".json":
        json.loads(path.read_bytes())
        return
    with safe_open(path, framework="pt"):
        pass


def restore_hint(rd: RunDir, saved: Path) -> str:
    last = rd.last_checkpoint()
    if last is None:
        return f"train again (the run has no checkpoint to restore {saved.name}/ from)"
    return (f"restore {saved.name}/ from the last checkpoint ({last} has the same files) with "
            f"`{copy_command(last, saved)}`, or train again")


def copy_command(checkpoint: Path, saved: Path) -> str:
    """The shell command that copies a checkpoint's weights, configs and tokenizer (not the optimizer and trainer
    state, which only --resume needs) to where the run keeps what it trained."""
    files = [p for p in sorted(checkpoint.iterdir()) if p.is_file() and not is_training_state(p.name)]
    sources, dest = " ".join(shlex.quote(str(p)) for p in files), shlex.quote(str(saved))
    return f"mkdir -p {dest} && cp {sources} {dest}/"


def is_training_state(name: str) -> bool:
    return name in CHECKPOINT_STATE or name.startswith("rng_state")


def stopped_early(checkpoint: Path) -> bool:
    """Whether the checkpoint is from before the run's last step, so --resume can still train on from it."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_bytes())
        return state["global_step"] < state["max_steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def checkpoint_sharded(checkpoint: Path) -> bool:
    """Saved by FSDP: its weights and optimizer are shards, one per process."""
    return (checkpoint / FSDP_OPTIMIZER).is_dir()


def checkpoint_processes(checkpoint: Path) -> int:
    """How many processes trained up to a checkpoint: each DDP rank saves its random state as rng_state_<rank>.pth,
    one process as rng_state.pth."""
    return len(list(checkpoint.glob("rng_state_*.pth"))) or 1


def check_checkpoint(checkpoint: Path) -> int:
    """The step of a checkpoint --resume can load (a crash or a full disk during its save leaves one that is not):
    the trainer state, the weights and, as the Trainer loads them, the optimizer and scheduler states; else an
    error with the command that removes it so the one before it is used."""
    import torch

    path = checkpoint / TRAINER_STATE
    try:
        step = json.loads(path.read_bytes())["global_step"]
        for path in sorted(checkpoint.glob("*.json")) + sorted(checkpoint.glob("*.safetensors")):
            read_saved_file(path)
        sharded = checkpoint_sharded(checkpoint)
        indexes = [checkpoint / FSDP_WEIGHTS / ".metadata", checkpoint / FSDP_OPTIMIZER / ".metadata"] if sharded \
            else []  # FSDP: weights and optimizer are shards in a folder each, found through its index
        for path in indexes:
            if not path.is_file():
                raise ValueError("missing: the save was cut short")
        states = [checkpoint / SCHEDULER] if sharded else [checkpoint / OPTIMIZER, checkpoint / SCHEDULER]
        for path in states:
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError):  # torch's errors on a bad file
                raise ValueError("not a PyTorch file that loads") from None  # (theirs suggest weights_only=False)
        return step
    except Exception as e:  # noqa: BLE001 -- OSError, JSON, safetensors and unpickling errors alike
        earlier = [p for p in RunDir(checkpoint.parent.parent).checkpoints() if p != checkpoint]
        fix = (f"remove it to continue from {earlier[-1].name}: rm -r {checkpoint}" if earlier else
               "it is the only checkpoint: start again under a new name (--set name=NEW_NAME)")
        raise UserError(f"--resume: the last checkpoint {checkpoint} cannot be loaded ({path.name}: "
                        f"{error_line(e)}); {fix}") from None


def interrupted_message(recipe: Recipe) -> str:
    """What a Ctrl-C left in the run directory, read from its files, and the command that goes on from there."""
    rd = RunDir(recipe.run_dir)
    if not rd.is_run():
        return "before training began: nothing was written; run the same command again"
    if rd.training_finished():  # removed when a resumed run trains further
        finished = rd.result.stat().st_mtime
        done = lambda path: path.is_file() and path.stat().st_mtime >= finished  # noqa: E731
        steps = []
        if recipe.eval.enabled and not done(rd.eval_json()):
            steps.append(f"python -m qlora_lite eval {rd}")
        if recipe.export.merge and recipe.method.spec.not_merged is None and not done(rd.merged / MERGE_CHECK):
            force = " --force" if rd.merged.exists() else ""
            steps.append(f"python -m qlora_lite merge {rd} --out {rd.merged} --dtype {recipe.export.dtype} "
                         f"--base {recipe.export.base}{force}")
        steps.append(f"python -m qlora_lite report {rd}")
        saved = next((d for d in (rd.saved_dir(True), rd.saved_dir(False)) if d.is_dir()), rd.path)
        return f"after training, which is complete and saved in {saved}; finish with: " + " && ".join(steps)
    last = rd.last_checkpoint()
    if last is None:
        return (f"before the first checkpoint (train.save_steps = {recipe.train.save_steps}): nothing to keep; "
                f"the same command with --resume starts {rd} over")
    return f"during training: {last.name} is kept in {last.parent}; continue from it with the same command and --resume"
