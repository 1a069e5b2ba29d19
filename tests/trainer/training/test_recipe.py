"""The training recipe, run for real (accelerate launch of trainer.train) on the tiny model."""

import json
import os
import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file

from tests.conftest import prepare_small_project, write_small_project
from trainer.data.caches import build_text_cache, build_vae_cache
from trainer.model.lora import LORA_WEIGHTS_NAME
from trainer.training.checkpoints import checkpoint_dirs
from trainer.workflow import check_data, load_project, training_command, training_env

pytestmark = pytest.mark.slow


def _launch(project, **overrides) -> subprocess.Popen:
    return subprocess.Popen(
        training_command(project, overrides), env=training_env(project), cwd=project.root,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def test_an_interrupted_run_resumes_to_the_same_weights(demo_root, tmp_path):
    """Killed mid-run, then relaunched with resume_from_checkpoint=latest: same LoRA as an uninterrupted run."""
    steps = 30  # the kill lands at the first checkpoint (5): 25 steps left, so the run cannot end first
    settings = dict(max_train_steps=steps, checkpointing_steps=5, gradient_accumulation_steps=2, lr_scheduler="cosine")
    reference = prepare_small_project(tmp_path / "uninterrupted", demo_root, **settings)
    assert _launch(reference).wait() == 0

    project = prepare_small_project(tmp_path / "interrupted", demo_root, resume_from_checkpoint="latest", **settings)
    process = _launch(project)
    checkpoints = project.output_dir / "checkpoints"
    deadline = time.time() + 300
    while not checkpoint_dirs(checkpoints) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "training ended before it could be interrupted"
    interrupted_at = int(checkpoint_dirs(checkpoints)[-1].name.split("-")[1])
    assert 0 < interrupted_at < steps
    assert not (project.lora_dir / LORA_WEIGHTS_NAME).exists()

    resumed = _launch(project)
    output, _ = resumed.communicate()
    assert resumed.returncode == 0, output
    summary = json.loads((project.output_dir / "training_summary.json").read_text())
    assert summary["steps"] == steps
    expected = load_file(reference.lora_dir / LORA_WEIGHTS_NAME)
    actual = load_file(project.lora_dir / LORA_WEIGHTS_NAME)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert (expected[key] - actual[key]).abs().max() < 1e-6, key


def test_repeats_show_each_sample_of_its_dataset_1_plus_repeats_times_per_epoch(demo_root, tmp_path):
    from trainer.training.data_order import training_samples

    config_path, data_path = write_small_project(tmp_path, demo_root / "demo" / "models", num_train_epochs=1, max_train_steps=0)
    entries = json.loads(data_path.read_text())
    entries[0]["repeats"] = 2
    data_path.write_text(json.dumps(entries))
    project = load_project(config_path, data_path, tmp_path)
    manifest, _ = check_data(project)
    samples = training_samples(manifest, project.dataset_config, project.config)
    names = list(manifest[manifest["split"] == "train"]["name"])
    assert sorted(name for name, _ in samples) == sorted(names * 3)
    assert project.config.resolved_max_train_steps(len(samples)) == 3 * len(names)  # an epoch counts the repeats


def test_checkpoints_rotate_to_the_limit(demo_root, tmp_path):
    project = prepare_small_project(tmp_path, demo_root, max_train_steps=8, checkpointing_steps=2, checkpoints_total_limit=2)
    process = _launch(project)
    output, _ = process.communicate()
    assert process.returncode == 0, output
    assert [p.name for p in checkpoint_dirs(project.output_dir / "checkpoints")] == ["checkpoint-6", "checkpoint-8"]


def test_ema_caption_dropout_and_random_reference_sampling(demo_root, tmp_path):
    """One run with every optional conditioning feature: each leaves its trace in caches and outputs."""
    import json as _json

    from trainer.data.caches import load_sample, sample_paths

    config_path, data_path = write_small_project(
        tmp_path, demo_root / "demo" / "models", max_train_steps=6, use_ema=True, ema_decay=0.9,
        caption_dropout_probability=0.5,
    )
    entries = _json.loads(data_path.read_text())
    entries[0]["conditioning_multidataset_sampling"] = "random"
    data_path.write_text(_json.dumps(entries))
    project = load_project(config_path, data_path, tmp_path)
    manifest, _ = check_data(project)
    build_text_cache(manifest, project.dataset_config, project.config)
    build_vae_cache(manifest, project.dataset_config, project.config)

    train_row = manifest[manifest["split"] == "train"].iloc[0]
    sample = load_sample(sample_paths(project.dataset_config, project.config, train_row), train_row["name"])
    assert sample.dropout_embeds is not None
    assert len(sample.per_reference_embeds) == 3
    # one reference in the prompt is a shorter sequence than three
    assert sample.per_reference_embeds[0][0].shape[0] < sample.prompt_embeds.shape[0]

    process = _launch(project)
    output, _ = process.communicate()
    assert process.returncode == 0, output
    trained = load_file(project.lora_dir / LORA_WEIGHTS_NAME)
    averaged = load_file(project.lora_dir / "ema" / LORA_WEIGHTS_NAME)
    assert trained.keys() == averaged.keys()
    assert any(not (trained[k] - averaged[k]).abs().max() < 1e-7 for k in trained)


def test_validation_during_training_writes_a_report_per_interval(demo_root, tmp_path, isolated_mlflow):
    from mlflow.tracking import MlflowClient

    project = prepare_small_project(tmp_path, demo_root, max_train_steps=4, validation_step_interval=2, report_to="mlflow")
    process = _launch(project)
    output, _ = process.communicate()
    assert process.returncode == 0, output
    for step in (2, 4):
        report = json.loads((project.output_dir / "validation" / f"step-{step}" / "report.json").read_text())
        assert [r["name"] for r in report["rows"]] == ["0000"]
        assert {"base_latent_mse", "lora_latent_mse"} <= report["summary"].keys()
    run_id = json.loads((project.output_dir / "training_summary.json").read_text())["mlflow_run_id"]
    history = MlflowClient(isolated_mlflow).get_metric_history(run_id, "validation_lora_latent_mse")
    assert [m.step for m in history] == [2, 4]


def test_scheduled_sampling_reaches_sigma_by_the_models_own_steps(demo_root, tmp_path):
    """The rollout input starts at a noisier σ and differs from the ground-truth noised latent."""
    import torch

    from trainer.data.caches import load_sample, sample_paths
    from trainer.model.loading import load_transformer
    from trainer.training.flow_matching import add_noise
    from trainer.training.loss import flow_matching_loss, rollout_input

    project = prepare_small_project(tmp_path, demo_root, max_train_steps=1)
    from trainer.workflow import load_manifest

    first = load_manifest(project).iloc[0]
    sample = load_sample(sample_paths(project.dataset_config, project.config, first), first["name"])
    transformer = load_transformer(project.config, torch.float32)
    sigma, noise = torch.tensor([0.5]), torch.randn((1, *sample.target.shape), generator=torch.Generator().manual_seed(0))
    truth = add_noise(sample.target[None], noise, sigma)
    rolled = rollout_input(transformer, sample, sigma, noise, offset=0.2, steps=2, dtype=torch.float32)
    assert rolled.shape == truth.shape and not torch.allclose(rolled, truth)
    # no offset: the rollout has nowhere to go and returns the ground truth
    assert torch.allclose(rollout_input(transformer, sample, sigma, noise, 0.0, 2, torch.float32), truth, atol=1e-6)
    assert torch.isfinite(flow_matching_loss(transformer, sample, sigma, noise, torch.float32, rolled))


def test_training_with_scheduled_sampling_runs(demo_root, tmp_path):
    from trainer.training.recipe import run_training

    project = prepare_small_project(tmp_path, demo_root, max_train_steps=3, scheduled_sampling_probability=1.0)
    result = run_training(project.config, project.dataset_config, project.manifest_path, project.root, tags={})
    assert result.steps == 3


def test_a_launch_on_caches_built_before_caption_dropout_was_switched_on_is_refused(demo_root, tmp_path):
    """`accelerate launch -m trainer.train` started directly (no cache stage before it): caches built
    without caption dropout hold no dropout embeddings, so training would silently skip the dropout.
    It stops before loading the model with one error naming a stale file and the command that
    rebuilds it, and no traceback."""
    project = prepare_small_project(tmp_path, demo_root)
    settings = json.loads(project.config_path.read_text())
    project.config_path.write_text(json.dumps({**settings, "caption_dropout_probability": 0.1}))
    process = _launch(project)
    output, _ = process.communicate()
    assert process.returncode != 0, output
    assert "Traceback" not in output, output
    (line,) = [line for line in output.splitlines() if line.startswith("error:")]
    assert "missing or were built from other settings" in line and str(tmp_path / "cache") in line and ".safetensors" in line
    assert f"qwen-edit cache --config {project.config_path}" in line
    assert not (project.lora_dir / LORA_WEIGHTS_NAME).exists()


def test_caches_built_before_random_sampling_was_switched_on_are_stale(demo_root, tmp_path):
    """`random` sampling needs an embedding per reference: a `combined` cache is refused until rebuilt."""
    from trainer.errors import DataError
    from trainer.training.recipe import LoraTrainingRecipe

    project = prepare_small_project(tmp_path, demo_root)
    LoraTrainingRecipe(project.config, project.dataset_config, project.manifest_path, project.root, {})._check_caches()
    entries = json.loads(project.data_path.read_text())
    entries[0]["conditioning_multidataset_sampling"] = "random"
    project.data_path.write_text(json.dumps(entries))
    project = load_project(project.config_path, project.data_path, project.root)
    recipe = LoraTrainingRecipe(project.config, project.dataset_config, project.manifest_path, project.root, {}, "REBUILD")
    with pytest.raises(DataError, match="4 cache file.*/cache/text_embeds/edits/0000.safetensors.*`REBUILD`"):
        recipe._check_caches()
    build_text_cache(load_manifest_of(project), project.dataset_config, project.config)
    recipe._check_caches()  # rebuilt: accepted


def load_manifest_of(project):
    from trainer.workflow import load_manifest

    return load_manifest(project)


# --- what the transformer receives, and where a run starts ---------------------------------


def _train_in_process(project, on_step=None):
    """The recipe's setup and training loop, in this process, recording every transformer call's inputs
    (a forward pre-hook on the real diffusers transformer)."""
    from trainer.tracking.reporting import SilentReporter
    from trainer.training.recipe import LoraTrainingRecipe

    recipe = LoraTrainingRecipe(project.config, project.dataset_config, project.manifest_path, project.root, {})
    recipe.setup()
    calls = []

    def record(module, args, kwargs):
        calls.append({k: v.detach().clone() if hasattr(v, "detach") else v for k, v in kwargs.items()})

    hook = recipe.accelerator.unwrap_model(recipe.transformer).register_forward_pre_hook(record, with_kwargs=True)
    try:
        recipe.train(SilentReporter(), on_step)
    finally:
        hook.remove()
        recipe.cleanup()
    return recipe, calls


def _drawn_samples(recipe):
    """The cached sample each micro-step draws (one process, rank 0)."""
    from trainer.data.caches import load_sample
    from trainer.training.data_order import micro_step_sample

    micro_steps = recipe.max_steps * recipe.config.gradient_accumulation_steps
    indices = [micro_step_sample(m, len(recipe.samples), recipe.config.seed, 1, 0) for m in range(micro_steps)]
    return [load_sample(recipe.samples[i][1], recipe.samples[i][0]) for i in indices]


def test_training_feeds_the_transformer_the_caption_dropout_embeddings(demo_root, tmp_path):
    """caption_dropout_probability 1.0: every step's text stream is the empty instruction's embeddings
    (encoded with all references), and all references still go in."""
    import torch

    from trainer.model.conditioning import pack

    project = prepare_small_project(tmp_path, demo_root, max_train_steps=3, gradient_accumulation_steps=2,
                                    caption_dropout_probability=1.0)
    recipe, calls = _train_in_process(project)
    samples = _drawn_samples(recipe)
    assert len(calls) == len(samples) == 6
    for call, sample in zip(calls, samples):
        dropout_embeds, _ = sample.dropout_embeds
        assert torch.equal(call["encoder_hidden_states"], dropout_embeds[None])
        assert not torch.equal(call["encoder_hidden_states"], sample.prompt_embeds[None])  # not the instruction's
        assert torch.equal(call["hidden_states"][:, -sum(pack(r[None]).shape[1] for r in sample.references):],
                           torch.cat([pack(r[None]) for r in sample.references], dim=1))
        assert len(call["img_shapes"][0]) == 1 + len(sample.references)


def test_random_reference_sampling_feeds_one_reference_with_its_own_embeddings(demo_root, tmp_path):
    """`random` sampling: each step one of the three references goes in, with the prompt embeddings
    encoded with that reference alone."""
    import torch

    from trainer.model.conditioning import pack

    config_path, data_path = write_small_project(tmp_path, demo_root / "demo" / "models", max_train_steps=8)
    entries = json.loads(data_path.read_text())
    entries[0]["conditioning_multidataset_sampling"] = "random"
    data_path.write_text(json.dumps(entries))
    project = load_project(config_path, data_path, tmp_path)
    manifest, _ = check_data(project)
    build_text_cache(manifest, project.dataset_config, project.config)
    build_vae_cache(manifest, project.dataset_config, project.config)

    recipe, calls = _train_in_process(project)
    samples = _drawn_samples(recipe)
    assert len(calls) == len(samples) == 8
    chosen = []
    for call, sample in zip(calls, samples):
        assert len(sample.references) == 3 and len(call["img_shapes"][0]) == 2  # the target and one reference
        matches = [i for i, (embeds, _) in enumerate(sample.per_reference_embeds)
                   if torch.equal(call["encoder_hidden_states"], embeds[None])]
        assert len(matches) == 1, "the text stream is not one reference's embeddings"
        (index,) = matches
        reference = pack(sample.references[index][None])
        assert call["hidden_states"].shape[1] == pack(sample.target[None]).shape[1] + reference.shape[1]
        assert torch.equal(call["hidden_states"][:, -reference.shape[1]:], reference)  # the same reference's latents
        chosen.append(index)
    assert len(set(chosen)) > 1  # drawn, not always the first


def test_a_finished_run_started_again_with_latest_trains_from_step_0(demo_root, tmp_path):
    """Re-materialising after a finished run (say, new pairs arrived) trains every step again;
    an interrupted run's checkpoint is still resumed."""
    import shutil

    from trainer.training.recipe import run_training

    project = prepare_small_project(tmp_path, demo_root, max_train_steps=3, checkpointing_steps=2,
                                    resume_from_checkpoint="latest")
    first = run_training(project.config, project.dataset_config, project.manifest_path, project.root, tags={})
    checkpoints = project.output_dir / "checkpoints"
    assert [p.name for p in checkpoint_dirs(checkpoints)] == ["checkpoint-2", "checkpoint-3"]  # the last is the finished run

    trained = []
    recipe, _ = _train_in_process(project, on_step=lambda step, loss, lr: trained.append(step))
    assert (recipe.resumed_from, recipe.start_step) == (None, 0)
    assert trained == [1, 2, 3]
    assert recipe.loss_history == first.loss_history  # same seed, same data: the same run again

    shutil.rmtree(checkpoints / "checkpoint-3", ignore_errors=True)  # as if killed after step 2 (a fresh run may have moved it aside)
    trained.clear()
    recipe, _ = _train_in_process(project, on_step=lambda step, loss, lr: trained.append(step))
    assert (recipe.resumed_from.name, recipe.start_step) == ("checkpoint-2", 2)
    assert trained == [3]


def test_training_lowers_the_held_out_loss_below_the_no_learning_baseline(demo_root, tmp_path):
    """The same fixed σ and noise over the training samples, adapters off (the base: the LoRA before
    training) and on. σ draws alone cannot move this ratio; they moved the first-vs-last-tenth one to 0.968."""
    from trainer.training.recipe import SUMMARY_NAME, run_training

    project = prepare_small_project(tmp_path, demo_root, max_train_steps=20, learning_rate=1e-2)
    result = run_training(project.config, project.dataset_config, project.manifest_path, project.root, tags={})
    base, lora = result.extra["held_out_base_loss"], result.extra["held_out_lora_loss"]
    assert lora < 0.95 * base, (base, lora)  # measured: 0.85 after these 20 steps, 1.0000 with learning_rate 1e-9
    summary = json.loads((project.output_dir / SUMMARY_NAME).read_text())
    assert (summary["held_out_base_loss"], summary["held_out_lora_loss"]) == (base, lora)
