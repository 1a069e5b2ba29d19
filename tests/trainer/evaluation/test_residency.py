"""Validation on a small card (`trainer/evaluation/residency.py`): the encoders and the transformer take
turns, a quantised or block-swapped base is loaded as training loads it, and neither changes an edit."""

import pytest
import torch

from tests.conftest import prepare_small_project
from trainer.evaluation.residency import TakingTurns
from trainer.evaluation.validation import run_validation, validate

pytestmark = pytest.mark.slow


class RecordedTurns(TakingTurns):
    """Which components wait in CPU memory during each phase."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.parked_during = {}

    def phase(self, name):
        context = super().phase(name)
        outer = self

        class Recorded:
            def __enter__(self):
                context.__enter__()
                outer.parked_during[name] = set(outer._parked)

            def __exit__(self, *exc):
                return context.__exit__(*exc)

        return Recorded()


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    from trainer.training.recipe import run_training

    root = tmp_path_factory.mktemp("trained")
    project = prepare_small_project(root, demo_root, base_model_precision="int8-quanto", gradient_checkpointing=True, max_train_steps=3)
    run_training(project.config, project.dataset_config, project.manifest_path, project.root, tags={})
    from trainer.data.pairing import read_manifest

    return project, read_manifest(project.manifest_path)


def test_each_phase_has_only_its_own_components_on_the_card_and_the_edits_are_the_same(trained, tmp_path):
    from trainer.model.loading import load_pipeline

    project, manifest = trained
    config, cpu = project.config, torch.device("cpu")
    reports = {}
    for one_at_a_time in (False, True):
        pipe = load_pipeline(config, cpu, torch.float32)
        turns = RecordedTurns(pipe, cpu, one_at_a_time=one_at_a_time)
        reports[one_at_a_time] = validate(pipe, config, manifest, tmp_path / str(one_at_a_time), ("base",), lambda stage: None, turns)
        if one_at_a_time:
            assert turns.parked_during == {"encode": {"transformer"}, "generate": {"text_encoder", "vae"},
                                           "decode": {"transformer", "text_encoder"}}
            turns.restore()
            assert set(turns._parked) == {"text_encoder", "vae"}  # the transformer is back for training
    assert reports[True].summary == reports[False].summary


def test_a_quantised_swapped_base_validates_as_training_loads_it(trained, tmp_path):
    """int8 with block swap: the LoRA loads into the quantised transformer, swap gives the same edits."""
    project, manifest = trained
    summaries = {}
    for blocks in (0, 2):
        config = project.config.model_copy(update={"blocks_to_swap": blocks})
        summaries[blocks] = run_validation(config, manifest, project.lora_dir, tmp_path / str(blocks)).summary
    assert summaries[0] == summaries[2]
    assert summaries[0]["lora_latent_mse"] != summaries[0]["base_latent_mse"]  # the LoRA was on for its row
