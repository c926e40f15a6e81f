"""Live curves: a run with report_to = ["tensorboard"] leaves event files that TensorBoard's own reader reads back
as the logged loss curve; a tracker that is not installed is refused before anything loads."""

import importlib.util

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import recipe_text
from qlora_lite import events, tracking
from qlora_lite.errors import UserError
from qlora_lite.recipe import TrainRecipe, load_recipe
from qlora_lite.run import run
from qlora_lite.rundir import RunDir


def make_recipe(tmp_path, model_dir, data_dir, overrides):
    path = tmp_path / "t.toml"
    path.write_text(recipe_text(model_dir, data_dir, tmp_path / "runs"))
    return load_recipe(path, overrides)


def test_tensorboard_holds_the_loss_curve_of_the_run(tmp_path, tiny_llama, tiny_data):
    recipe = make_recipe(tmp_path, tiny_llama, tiny_data, ['train.report_to=["tensorboard"]', "train.max_steps=6"])
    seen = []
    result = run(recipe, notify=seen.append)
    folder = RunDir(result.run_dir).tensorboard
    assert events.TensorBoardWriting(folder) in seen
    curves = EventAccumulator(str(folder))
    curves.Reload()
    loss = [(s.step, s.value) for s in curves.Scalars("train/loss")]
    logged = RunDir(result.run_dir).losses()
    assert [step for step, _ in loss] == [step for step, _ in logged] == [1, 2, 3, 4, 5, 6]
    assert [value for _, value in loss] == pytest.approx([value for _, value in logged], rel=1e-6)
    tags = set(curves.Tags()["scalars"])
    assert {"train/learning_rate", "train/grad_norm", "train/tokens_per_s", "memory/process_rss_gib"} <= tags


def test_a_tracker_that_is_not_installed_is_refused_before_loading(tmp_path, monkeypatch, tiny_data):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorboard", "wandb")
                        else real(name, *a))
    for tracker, fix in (("tensorboard", "pip install tensorboard"), ("wandb", "pip install wandb")):
        recipe = make_recipe(tmp_path, tmp_path / "no-model-here", tiny_data, [f'train.report_to=["{tracker}"]'])
        with pytest.raises(UserError, match=f"train.report_to.*{fix}"):
            run(recipe)
        assert not recipe.run_dir.exists()


def test_the_trainer_reports_only_to_wandb_itself():
    assert tracking.trainer_report_to(TrainRecipe(report_to=["tensorboard"])) == "none"
    assert tracking.trainer_report_to(TrainRecipe(report_to=["tensorboard", "wandb"])) == ["wandb"]
