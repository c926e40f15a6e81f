"""A damaged or half-finished run directory, and a bad eval.forgetting source: one clear error each (exit status 2,
no traceback) that says how to get on, and nothing the run saved is lost or overwritten."""

import hashlib
import json
import re
import shutil
import subprocess

import pytest

from conftest import make_rows, recipe_text
from qlora_lite.cli import main
from qlora_lite.errors import UserError
from qlora_lite.evaluate import forgetting_texts
from qlora_lite.export import readable_eval_json
from qlora_lite.rundir import export_clash

EVAL = "max_samples = 2\nmax_new_tokens = 4\nbatch_size = 2"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, tiny_data):
    """One evaluated 4-step run with checkpoints at steps 2 and 4, trained once for the module; copy it to damage."""
    root = tmp_path_factory.mktemp("trained")
    text = recipe_text(tiny_llama, tiny_data, root / "runs", name="r", eval=EVAL)
    text = text.replace("enabled = false", "enabled = true").replace("max_steps = 12", "max_steps = 4")
    (root / "r.toml").write_text(text.replace("save_steps = 6", "save_steps = 2"))
    assert main(["run", str(root / "r.toml")]) == 0
    return root / "runs" / "r"


@pytest.fixture
def run_copy(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "r")


def failed(capsys, argv: list[str]) -> str:
    """stderr of a command that must end in one clear error, exit status 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error:")
    return err


def digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------- damaged weights


@pytest.mark.parametrize("name, content", [("adapter_model.safetensors", "junk\n"), ("adapter_config.json", "{\n")])
def test_eval_and_merge_name_a_damaged_adapter_file_and_the_checkpoint_to_restore(run_copy, tmp_path, capsys,
                                                                                 name, content):
    (run_copy / "adapter" / name).write_text(content)
    for argv in (["eval", str(run_copy)], ["merge", str(run_copy), "--out", str(tmp_path / "out")]):
        err = failed(capsys, argv)
        assert f"{run_copy / 'adapter' / name} cannot be read (" in err and "damaged" in err
        assert "restore adapter/ from the last checkpoint" in err
        assert str(run_copy / "checkpoints" / "checkpoint-4") in err
    assert not (tmp_path / "out").exists()


def test_a_damaged_full_model_without_checkpoints_says_train_again(run_copy, tiny_llama, capsys):
    shutil.rmtree(run_copy / "adapter")
    shutil.rmtree(run_copy / "checkpoints")
    shutil.copytree(tiny_llama, run_copy / "model")  # model/ as full fine-tuning saves it
    (run_copy / "model" / "model.safetensors").write_bytes(b"\x00" * 3)
    err = failed(capsys, ["eval", str(run_copy)])
    assert "model/model.safetensors cannot be read (SafetensorError" in err
    assert "train again (the run has no checkpoint to restore model/ from)" in err


def test_a_missing_weights_file_is_named(run_copy, capsys):
    (run_copy / "adapter" / "adapter_model.safetensors").unlink()
    err = failed(capsys, ["eval", str(run_copy)])
    assert "adapter_model.safetensors is missing: restore adapter/" in err


# ---------------------------------------------------------------- no adapter/ but checkpoints


def test_a_finished_run_without_adapter_gives_the_copy_command_that_works(run_copy, capsys):
    shutil.rmtree(run_copy / "adapter")
    err = failed(capsys, ["eval", str(run_copy)])
    assert "has no trained weights in adapter/" in err and "checkpoint-4 has those of step 4" in err
    assert "--resume" not in err  # it trained all its steps: --resume would refuse, a loop
    command = re.search(r"`(mkdir -p [^`]*)`", err).group(1)
    assert "adapter_model.safetensors" in command and "adapter_config.json" in command
    assert "optimizer.pt" not in command and "trainer_state.json" not in command
    subprocess.run(command, shell=True, check=True)
    assert main(["eval", str(run_copy)]) == 0


def test_a_run_stopped_before_its_last_step_may_also_resume(run_copy, capsys):
    shutil.rmtree(run_copy / "adapter")
    shutil.rmtree(run_copy / "checkpoints" / "checkpoint-4")
    err = failed(capsys, ["merge", str(run_copy), "--out", str(run_copy / "merged")])
    assert "checkpoint-2 has those of step 2" in err and "cp " in err and "continue training with --resume" in err


# ---------------------------------------------------------------- merge --out inside the run


@pytest.mark.parametrize("out, what", [
    ("adapter", "is the run's adapter/"), ("adapter/sub", "is inside the run's adapter/"),
    (".", "is the run directory"), ("checkpoints/checkpoint-4", "is inside the run's checkpoints/"),
    ("model", "is the run's model/"), ("..", "is a parent folder of the run directory"),
])
def test_merge_refuses_an_out_that_holds_what_training_saved_even_with_force(run_copy, capsys, out, what):
    before = {d: digests(run_copy / d) for d in ("adapter", "checkpoints/checkpoint-4")}
    listing = sorted(p.name for p in run_copy.iterdir())
    err = failed(capsys, ["merge", str(run_copy), "--out", str(run_copy / out), "--force"])
    assert what in err and "would overwrite what training saved" in err and str(run_copy / "merged") in err
    assert {d: digests(run_copy / d) for d in before} == before
    assert sorted(p.name for p in run_copy.iterdir()) == listing


def test_the_runs_own_merged_folder_and_folders_beside_it_stay_allowed(tmp_path):
    run = tmp_path / "runs" / "r"
    assert export_clash(run / "merged", run) is None and export_clash(tmp_path / "runs" / "export", run) is None
    assert export_clash(run / "adapter-copy", run) is None


# ---------------------------------------------------------------- report on damaged files


def test_report_skips_a_half_written_line_and_names_unreadable_files(run_copy, capsys):
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write("garbage{\n")
    (run_copy / "eval.json").write_text('{"base": 1')
    (run_copy / "memory_report.json").write_text("nope")
    (run_copy / "report.md").unlink()
    assert main(["report", str(run_copy)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    text = (run_copy / "report.md").read_text()
    assert "Skipped 1 unreadable line(s) of metrics.jsonl" in text and "at step 4." in text  # the rest is kept
    assert "eval.json cannot be read (JSONDecodeError" in text and f"python -m qlora_lite eval {run_copy}" in text
    assert "memory_report.json cannot be read (JSONDecodeError" in text


def test_a_model_card_leaves_out_a_damaged_eval_json(tmp_path):
    (tmp_path / "eval.json").write_text('{"base": 1')
    assert readable_eval_json(tmp_path / "eval.json") is None and readable_eval_json(tmp_path / "no.json") is None
    (tmp_path / "eval.json").write_text(json.dumps({"base": {"rouge1": 0.1}, "tuned": {"rouge1": 0.2}}))
    assert readable_eval_json(tmp_path / "eval.json")["tuned"] == {"rouge1": 0.2}


# ---------------------------------------------------------------- eval.forgetting


def test_forgetting_refuses_text_that_is_not_utf8_or_empty(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("Zoë brings the cake.\nLéa is late.".encode("latin-1"))
    with pytest.raises(UserError, match=r"eval.forgetting \(.*latin1.txt\): not UTF-8 text \(byte 0xeb on line 1\)"):
        forgetting_texts(str(tmp_path / "latin1.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        forgetting_texts(str(tmp_path / "empty.txt"))
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": null}\n{"text": 3}\n')
    with pytest.raises(UserError, match="has no text"):
        forgetting_texts(str(tmp_path / "blank.jsonl"))


def test_forgetting_reads_parquet_and_refuses_a_damaged_one(tmp_path):
    import pandas as pd

    texts = [r["dialogue"] for r in make_rows(3, seed=5)]
    pd.DataFrame({"text": texts}).to_parquet(tmp_path / "general.parquet")
    assert forgetting_texts(str(tmp_path / "general.parquet")) == texts
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UserError, match=r"eval.forgetting \(.*bad.parquet\): cannot read it as parquet"):
        forgetting_texts(str(tmp_path / "bad.parquet"))


def test_forgetting_offline_hub_id_says_to_use_a_local_file(monkeypatch):
    import datasets

    def offline(*args, **kwargs):  # what load_dataset("wikitext") raises under HF_HUB_OFFLINE=1 (datasets 4-5)
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="cannot reach the dataset hub.*local .txt or .jsonl file with a text column"):
        forgetting_texts("wikitext")


def test_forgetting_is_cheap_to_check_twice_and_writes_nothing(tmp_path):
    (tmp_path / "general.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "general.txt").write_text("Ana brings the cake.")
    for name, texts in (("general.jsonl", ["one", "two"]), ("general.txt", ["Ana brings the cake."])):
        assert forgetting_texts(str(tmp_path / name)) == forgetting_texts(str(tmp_path / name)) == texts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["general.jsonl", "general.txt"]
