"""Ctrl-C: the first one finishes the step and saves a checkpoint, a second one stops at once; either way the
message names what was kept and the command that goes on, and that command works."""

import json
import os
import signal

import pytest
from transformers import TrainerCallback

from conftest import recipe_text
from qlora_lite import evaluate
from qlora_lite import train as train_stage
from qlora_lite.cli import main
from qlora_lite.rundir import RunDir

EVAL = ["--set", "eval.enabled=true", "--set", "eval.max_samples=4", "--set", "eval.max_new_tokens=8"]


@pytest.fixture(autouse=True)
def ctrl_c_as_in_a_terminal():
    """Python's own Ctrl-C handler, as a terminal gives it: a test run started in the background (`cmd &` in a
    script) inherits SIGINT ignored, and these tests check that training puts back what was there."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def write_recipe(tmp_path, tiny_llama, tiny_data, name="c"):
    path = tmp_path / f"{name}.toml"
    path.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", name=name))
    return path, tmp_path / "runs" / name


def ctrl_c_during_step(monkeypatch, step: int, times: int = 1):
    """Send SIGINT to this process `times` times while optimizer step `step` runs, as a terminal would."""

    class CtrlC(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step - 1:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)

    real = train_stage.build_trainer

    def build_trainer(*args, **kwargs):
        trainer = real(*args, **kwargs)
        trainer.add_callback(CtrlC())
        return trainer

    monkeypatch.setattr(train_stage, "build_trainer", build_trainer)


def logged_steps(run_dir):
    return [step for step, _ in RunDir(run_dir).losses()]


def test_first_ctrl_c_finishes_the_step_saves_a_checkpoint_and_resume_completes(tmp_path, tiny_llama, tiny_data,
                                                                                 monkeypatch, capsys):
    path, run_dir = write_recipe(tmp_path, tiny_llama, tiny_data)
    ctrl_c_during_step(monkeypatch, 3)
    assert main(["run", str(path)]) == 130
    out, err = capsys.readouterr()
    assert "checkpoint-3 is kept" in err and "--resume" in err and "Traceback" not in err
    assert "stopped by Ctrl-C: 3 of 12 steps" in out
    assert [p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")] == ["checkpoint-3"]  # save_steps is 6
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run_dir / "result.json").exists()  # training is not complete
    assert logged_steps(run_dir) == [1, 2, 3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works as usual afterwards
    assert main(["report", str(run_dir)]) == 0  # it read "12 steps" as if they had been trained
    assert "**Training has not finished**: the last logged step is 3" in (run_dir / "report.md").read_text()

    monkeypatch.undo()
    seen = lambda n: json.loads((run_dir / f"checkpoints/checkpoint-{n}/trainer_state.json").read_text())[
        "num_input_tokens_seen"]
    at_3 = seen(3)
    assert main(["run", str(path), "--resume"]) == 0
    assert logged_steps(run_dir) == list(range(1, 13))
    assert "has not finished" not in (run_dir / "report.md").read_text()
    result = json.loads((run_dir / "result.json").read_text())
    # tokens/s of this session: the 9 resumed steps' tokens, not the 12 steps' (it read 33% fast)
    assert result["tokens_per_s"] * result["train_seconds"] == pytest.approx(seen(12) - at_3)


def test_second_ctrl_c_stops_at_once_and_says_what_is_left(tmp_path, tiny_llama, tiny_data, monkeypatch, capsys):
    path, run_dir = write_recipe(tmp_path, tiny_llama, tiny_data)
    ctrl_c_during_step(monkeypatch, 2, times=2)
    assert main(["run", str(path)]) == 130
    err = capsys.readouterr().err
    assert "before the first checkpoint (train.save_steps = 6)" in err and "--resume starts" in err
    assert not list(run_dir.glob("checkpoints/checkpoint-*")) and not (run_dir / "adapter").exists()
    assert logged_steps(run_dir) == [1]
    monkeypatch.undo()
    assert main(["run", str(path), "--resume"]) == 0  # starts over in the same folder
    assert logged_steps(run_dir) == list(range(1, 13))


def test_ctrl_c_during_evaluation_names_the_commands_that_finish_the_run(tmp_path, tiny_llama, tiny_data,
                                                                         monkeypatch, capsys):
    path, run_dir = write_recipe(tmp_path, tiny_llama, tiny_data)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate_run", interrupted)
    assert main(["run", str(path), *EVAL, "--set", "export.merge=true", "--set", "export.dtype=fp32"]) == 130
    err = " ".join(capsys.readouterr().err.split())  # rich folds long lines
    assert "training, which is complete" in err
    eval_cmd = f"python -m qlora_lite eval {run_dir}"
    merge_cmd = f"python -m qlora_lite merge {run_dir} --out {run_dir / 'merged'} --dtype fp32 --base dequantized"
    assert eval_cmd in err and merge_cmd in err and f"python -m qlora_lite report {run_dir}" in err
    assert (run_dir / "result.json").is_file() and not (run_dir / "eval.json").exists()

    monkeypatch.undo()
    for command in (eval_cmd, merge_cmd, f"python -m qlora_lite report {run_dir}"):
        assert main(command.split()[3:]) == 0, command
    assert (run_dir / "eval.json").is_file() and (run_dir / "merged" / "merge_check.json").is_file()


def test_compare_resume_evaluates_a_method_stopped_after_training(tmp_path, tiny_llama, tiny_data, monkeypatch,
                                                                 capsys):
    path, _ = write_recipe(tmp_path, tiny_llama, tiny_data, name="cmp")
    sub = tmp_path / "runs" / "cmp-compare" / "qlora"
    args = ["compare", str(path), "--methods", "qlora", *EVAL]
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(args) == 130
    said = " ".join(capsys.readouterr().err.split())  # not the run's eval commands: they leave the comparison undone
    assert f"during the qlora run ({sub}); what finished is kept: continue the comparison with the same command" in said
    trained_at = (sub / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns

    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0  # used to retrain, and be refused: "already trained 12 steps"
    assert (sub / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == trained_at  # not trained again
    assert (sub / "eval.json").is_file() and (sub.parent / "comparison.json").is_file()

    (sub / "eval.json").write_text('{"base": {"rouge1": 0.1')  # a half-written file
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{sub / 'eval.json'}: cannot read it" in err and f"python -m qlora_lite eval {sub}" in err
    assert main(["eval", str(sub)]) == 0 and main([*args, "--resume"]) == 0


@pytest.mark.parametrize("times, said", [(1, "after training, which is complete"), (2, "checkpoint-6 is kept")])
def test_ctrl_c_in_the_last_step(tmp_path, tiny_llama, tiny_data, monkeypatch, capsys, times, said):
    """Once: training completes (result.json) and the run stops before evaluating; twice: the step is lost. The
    handler is ours only while trainer.train runs: afterwards a Ctrl-C stops at once again."""
    path, run_dir = write_recipe(tmp_path, tiny_llama, tiny_data, name=f"h{times}")
    ctrl_c_during_step(monkeypatch, 12, times=times)
    assert main(["run", str(path), *EVAL]) == 130
    assert said in " ".join(capsys.readouterr().err.split())
    assert (run_dir / "result.json").is_file() == (times == 1) and not (run_dir / "eval.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_steps_after_the_checkpoint_are_logged_once_when_trained_again(tmp_path, tiny_llama, tiny_data, monkeypatch):
    """Stopped at once in step 8: steps 7 were logged but not checkpointed (checkpoint-6). Resumed, step 7 is
    trained again; metrics.jsonl held two step-7 rows, and the loss curve a step back in time."""
    path, run_dir = write_recipe(tmp_path, tiny_llama, tiny_data)
    ctrl_c_during_step(monkeypatch, 8, times=2)
    assert main(["run", str(path)]) == 130
    assert logged_steps(run_dir) == list(range(1, 8))
    monkeypatch.undo()
    assert main(["run", str(path), "--resume"]) == 0
    assert logged_steps(run_dir) == list(range(1, 13))
    memory_steps = [json.loads(line)["step"] for line in (run_dir / "memory.jsonl").read_text().splitlines()]
    assert memory_steps == sorted(memory_steps)  # the resumed run samples again at its first step, 6: not back
