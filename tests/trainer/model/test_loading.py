"""Finding a model in the local Hugging Face cache: only "not there" means None. Weights load from
.safetensors only: a pickled .bin in a model folder is never opened."""

import pickle
import shutil

import pytest
import torch
from huggingface_hub.errors import HFValidationError

from trainer.config.schema import TrainConfig
from trainer.errors import ConfigError
from trainer.model.loading import cached_snapshot, load_pipeline, load_transformer

MODEL = "Qwen/Qwen-Image-Edit"
COMMIT = "0" * 40


def test_a_model_not_in_the_cache_is_none(tmp_path):
    assert cached_snapshot(MODEL, cache_dir=tmp_path) is None


def test_a_cached_model_is_its_snapshot_folder(tmp_path):
    repo = tmp_path / "models--Qwen--Qwen-Image-Edit"  # the cache's layout, as huggingface_hub writes it
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    assert cached_snapshot(MODEL, cache_dir=tmp_path) == snapshot


def test_other_failures_are_not_taken_for_a_missing_model(tmp_path):
    with pytest.raises(HFValidationError):
        cached_snapshot("not//a/repo id", cache_dir=tmp_path)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_model_folder_with_pickled_weights_is_refused_unread(demo_root, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(demo_root / "demo" / "models" / "tiny-edit-v2", folder)
    marker = tmp_path / "payload-ran"
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.unlink()
    (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload(marker)}))
    config = TrainConfig(model_flavour="edit-v2", pretrained_model_name_or_path=str(folder))
    with pytest.raises(ConfigError, match="from .safetensors files only"):
        load_transformer(config, torch.float32)
    with pytest.raises(ConfigError, match="from .safetensors files only"):
        load_pipeline(config, torch.device("cpu"), torch.float32, text_encoder=False, vae=False)
    assert not marker.exists()
