"""The whole job through the command line: run with evaluation and merge, then eval, merge and report on it."""

import json
import os

from conftest import recipe_text
from qlora_lite import events
from qlora_lite.cli import TrainingView, main


def test_run_evaluates_merges_and_reports_then_subcommands_work(tmp_path, tiny_llama, tiny_data, capsys):
    path = tmp_path / "r.toml"
    path.write_text(recipe_text(tiny_llama, tiny_data, tmp_path / "runs", name="full",
                                eval="max_samples = 4\nmax_new_tokens = 8\nbatch_size = 2\nmetrics = [\"rouge\", \"bleu\"]",
                                export='merge = true\ndtype = "fp32"').replace("enabled = false", "enabled = true"))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "rougeL" in out and "matches" in out
    # Not a terminal (a log file, nohup, tee): a plain line per logged step instead of a live bar.
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == [f"{i}/12" for i in range(1, 13)]  # logging_steps = 1
    assert all(" loss " in s and " lr " in s and "tok/s" in s and "RSS" in s and "ETA" in s for s in steps)
    # The settings that differ from the defaults, and where all of them are; not the ~80-line resolved recipe.
    assert "train.max_steps = 12" in out and str(tmp_path / "runs" / "full" / "recipe.toml") in out
    assert "save_total_limit" not in out
    d = tmp_path / "runs" / "full"
    result = json.loads((d / "eval.json").read_text())
    assert result["n"] == 4 and set(result["base"]) >= {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu"}
    assert all(0 <= v <= 1 for v in result["tuned"].values())
    assert json.loads((d / "merged" / "merge_check.json").read_text())["passed"] is True
    assert (d / "report.md").is_file() and (d / "memory_report.md").is_file()

    saved = (d / "recipe.toml").read_text()  # the training file moved since: eval, merge and report need it not
    (d / "recipe.toml").write_text(saved.replace(str(tiny_data / "train.jsonl"), str(tmp_path / "moved.jsonl")))
    own = (d / "eval.json").read_text()
    assert main(["eval", str(d), "--split", "eval"]) == 0  # another split: the run's own evaluation is kept
    assert (d / "eval.json").read_text() == own and json.loads(own)["split"] == "test"
    assert json.loads((d / "eval-eval.json").read_text())["split"] == "eval"
    assert "(eval split, 4 examples)" in (d / "samples-eval.md").read_text()
    out_dir = tmp_path / "export"
    assert main(["merge", str(d), "--out", str(out_dir), "--dtype", "fp32", "--base", "original"]) == 0
    assert main(["merge", str(d), "--out", str(out_dir)]) == 2  # not empty, no --force
    assert "--force" in capsys.readouterr().err
    assert main(["report", str(d)]) == 0


def test_eval_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a run directory" in err and "Traceback" not in err


def test_no_route_to_the_hub_means_offline_mode_at_once(monkeypatch):
    """Without this, every hub lookup retried for ~23 s before an offline user saw "model not found"."""
    from qlora_lite.cli import PROXY_VARIABLES, work_offline_without_network

    for name in ("HF_HUB_OFFLINE", *PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://localhost")  # resolves: stay online
    assert not work_offline_without_network() and "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")  # .invalid never resolves (RFC 2606)
    assert work_offline_without_network() and os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.invalid:3128")  # a proxy resolves names: leave it
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not work_offline_without_network()


def test_each_logged_step_is_one_plain_line_with_memory_and_an_eta_from_where_training_resumed(capsys):
    view = TrainingView()
    assert not view.live  # pytest captures stdout: not a terminal
    view.notify(events.TrainingStarted(step=4, max_steps=10))  # resumed at step 4
    view.notify(events.MemorySampled(step=6, gib=1.5, on_gpu=True))
    view.notify(events.StepLogged(step=6, max_steps=10, loss=1.25, learning_rate=2e-4, tokens_per_s=1234.0,
                                  elapsed_s=20.0))  # 2 steps in 20 s: 4 more take 40 s
    assert capsys.readouterr().out == "step 6/10  loss 1.2500  lr 2.00e-04  1,234 tok/s  GPU 1.50 GiB  ETA 0:40\n"
