"""The timestep options through the real training step: flow_schedule_auto_shift on the tiny model reads its
scheduler config and shifts each sample's σ for that sample's token count, as the pipeline would at that size."""

import json
from pathlib import Path

import pytest

from tests.conftest import prepare_small_project
from trainer.data.caches import load_sample
from trainer.tracking.reporting import SilentReporter
from trainer.training.flow_matching import DynamicShift, image_seq_len
from trainer.training.recipe import LoraTrainingRecipe

pytestmark = pytest.mark.slow


def test_auto_shift_trains_with_the_models_scheduler_and_each_samples_token_count(demo_root, tmp_path):
    project = prepare_small_project(
        tmp_path, demo_root, max_train_steps=2, flow_schedule_auto_shift=True, flow_use_uniform_schedule=True
    )
    recipe = LoraTrainingRecipe(project.config, project.dataset_config, project.manifest_path, project.root, tags={})
    recipe.setup()
    on_disk = json.loads((Path(recipe.config.model_path) / "scheduler" / "scheduler_config.json").read_text())
    expected = DynamicShift.from_scheduler_config(on_disk)
    assert recipe.sigma_schedule.dynamic == expected and expected.use_dynamic_shifting
    assert recipe.sigma_schedule.distribution == "uniform"

    schedule, drawn = recipe.sigma_schedule, []

    class Recording:
        def sample(self, generator, tokens=None, n=1):
            drawn.append((tokens, schedule.shift_for(tokens)))
            return schedule.sample(generator, tokens, n)

        def __getattr__(self, name):
            return getattr(schedule, name)

    recipe.sigma_schedule = Recording()
    recipe.train(SilentReporter())
    tokens = {image_seq_len(recipe.config.flavour, load_sample(paths, name).target) for name, paths in recipe.samples}
    assert len(drawn) == 2 and {t for t, _ in drawn} <= tokens
    assert all(shift == pytest.approx(expected.shift_for(t)) and shift != pytest.approx(1.73) for t, shift in drawn)
