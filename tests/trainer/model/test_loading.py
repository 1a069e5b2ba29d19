"""Finding a model in the local Hugging Face cache: only "not there" means None."""

import pytest
from huggingface_hub.errors import HFValidationError

from trainer.model.loading import cached_snapshot

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
