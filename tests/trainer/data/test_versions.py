"""Data versions: the manifest's is its file's hash; a cache's follows exactly what its files depend on."""

import hashlib
import json
import os

import pytest

from tests.conftest import prepare_small_project
from trainer.data.caches import build_text_cache, build_vae_cache
from trainer.data.versions import cache_version, manifest_version
from trainer.workflow import check_data, load_manifest, load_project


@pytest.fixture(scope="module")
def project(demo_root, tmp_path_factory):
    """A small edit-v2 project with its manifest checked and both caches built."""
    return prepare_small_project(tmp_path_factory.mktemp("versions"), demo_root)


def _versions(project, config=None, dataset_config=None) -> tuple[str, str]:
    manifest = load_manifest(project)
    config, dataset_config = config or project.config, dataset_config or project.dataset_config
    return tuple(cache_version(manifest, dataset_config, config, kind) for kind in ("text", "vae"))


def test_manifest_version_is_the_hash_of_the_manifest_file(project):
    expected = hashlib.sha256(project.manifest_path.read_bytes()).hexdigest()[:16]
    assert manifest_version(project.manifest_path) == expected


def test_a_changed_caption_changes_the_manifest_version(demo_root, tmp_path):
    small = prepare_small_project(tmp_path, demo_root)
    before = manifest_version(small.manifest_path)
    caption = sorted(small.dataset_config.resolve(small.dataset_config.by_id("edits").instance_data_dir).glob("*.txt"))[0]
    caption.write_text("make everything green")
    check_data(small)
    assert manifest_version(small.manifest_path) != before


def test_caption_dropout_changes_the_text_cache_version_only(project):
    text, vae = _versions(project)
    dropout = project.config.model_copy(update={"caption_dropout_probability": 0.3})
    text_dropout, vae_dropout = _versions(project, config=dropout)
    assert text_dropout != text  # the text cache then also holds the empty-instruction embeddings
    assert vae_dropout == vae  # the latents do not depend on the caption


def test_strict_crops_change_both_cache_versions(project):
    raw = json.loads(project.data_path.read_text())
    for entry in raw:
        if entry.get("dataset_type") == "conditioning":
            entry["conditioning_type"] = "reference_loose"
    loose_path = project.root / "multidatabackend_loose.json"
    loose_path.write_text(json.dumps(raw))
    loose = load_project(project.config_path, loose_path, project.root)
    text, vae = _versions(project)
    text_loose, vae_loose = _versions(project, dataset_config=loose.dataset_config)
    assert text_loose != text and vae_loose != vae


def test_same_inputs_give_the_same_version_and_touching_files_keeps_it(project):
    before = _versions(project)
    manifest = load_manifest(project)
    for path in manifest["target_path"]:
        os.utime(path)  # same bytes, new mtime: the caches are still current
    assert _versions(project) == before


def test_the_version_names_what_a_cache_pass_writes(demo_root, tmp_path):
    """Computed before encoding, it equals the version of the cache that the pass then writes."""
    small = prepare_small_project(tmp_path, demo_root)
    manifest = load_manifest(small)
    dropout = small.config.model_copy(update={"caption_dropout_probability": 0.5})
    expected = cache_version(manifest, small.dataset_config, dropout, "text")
    build_text_cache(manifest, small.dataset_config, dropout)
    build_vae_cache(manifest, small.dataset_config, dropout)
    assert cache_version(manifest, small.dataset_config, dropout, "text") == expected
