"""Cache pruning deletes only files this cache wrote (issue 18 §3).

A cache pass prunes files whose sample left the manifest. It used to delete every `*.safetensors`
in the folder: `cache_dir_vae` pointing at a LoRA folder deleted both LoRA files. Now each cache
file carries a marker in its safetensors metadata and only marked files are pruned.
"""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.config.parsing import parse_train_config
from trainer.data.caches import WRITER, WRITER_KEY, build_vae_cache, prune_cache_folders
from trainer.data.dataset_config import parse_dataset_config
from trainer.data.pairing import build_manifest
from trainer.demo.dataset import generate_demo_dataset
from trainer.demo.tiny_model import build_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_edit_v2(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-edit-v2", flavour="edit-v2")


def lora_folder(folder: Path) -> dict[str, bytes]:
    """A LoRA as the trainer saves it: two safetensors files with diffusers' metadata, not ours."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 32)}
    save_file(weights, str(folder / "pytorch_lora_weights.safetensors"), metadata={"format": "pt", "lora_adapter_metadata": "{}"})
    save_file(weights, str(folder / "pytorch_lora_weights_comfyui.safetensors"))
    return {p.name: p.read_bytes() for p in folder.glob("*.safetensors")}


def vae_pass(root: Path, model: Path, data, cache_dir: Path):
    config = parse_train_config({"model_flavour": "edit-v2", "pretrained_model_name_or_path": str(model)})
    entries = [
        {"id": "edits", "instance_data_dir": str(data.folder("train", "edited")), "resolution": 32,
         "conditioning_data": ["refs"], "cache_dir_vae": str(cache_dir)},
        {"id": "refs", "dataset_type": "conditioning", "instance_data_dir": str(data.folder("train", "reference"))},
    ]
    dataset_config = parse_dataset_config(entries, "multidatabackend.json", config.flavour, root)
    manifest = build_manifest(dataset_config, config.flavour)[0]
    return build_vae_cache(manifest, dataset_config, config, CPU)


@pytest.mark.slow
def test_a_vae_cache_pointed_at_a_lora_folder_never_deletes_the_lora(tmp_path, tiny_edit_v2):
    data = generate_demo_dataset(tmp_path / "data", n_train=3, n_eval=1, size=32)
    lora = tmp_path / "output" / "lora"
    before = lora_folder(lora)
    assert vae_pass(tmp_path, tiny_edit_v2, data, lora).encoded == 3
    with safe_open(str(lora / "0000.safetensors"), framework="pt") as handle:
        assert handle.metadata()[WRITER_KEY] == WRITER  # every cache file says that the cache wrote it
    for folder in ("edited", "reference"):
        (data.folder("train", folder) / "0002.png").unlink()
    stats = vae_pass(tmp_path, tiny_edit_v2, data, lora)
    assert stats.pruned == 1  # the cache file of the removed sample, and nothing else
    assert {p.name: p.read_bytes() for p in lora.glob("pytorch_lora_weights*.safetensors")} == before
    assert sorted(p.stem for p in lora.glob("0*.safetensors")) == ["0000", "0001"]


def test_pruning_removes_marked_and_older_cache_files_and_leaves_every_other_file(tmp_path):
    tensors = {"target": torch.zeros(1)}
    save_file(tensors, str(tmp_path / "kept.safetensors"), metadata={WRITER_KEY: WRITER, "fingerprint": "a", "quick": "b"})
    save_file(tensors, str(tmp_path / "orphan.safetensors"), metadata={WRITER_KEY: WRITER, "fingerprint": "a", "quick": "b"})
    save_file(tensors, str(tmp_path / "before-the-marker.safetensors"), metadata={"fingerprint": "a", "quick": "b"})
    save_file(tensors, str(tmp_path / "users-own.safetensors"), metadata={"fingerprint": "mine"})
    save_file(tensors, str(tmp_path / "no-metadata.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "orphan.safetensors")
    assert prune_cache_folders([tmp_path], {tmp_path / "kept.safetensors"}) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "garbage.safetensors", "kept.safetensors", "link.safetensors", "no-metadata.safetensors", "users-own.safetensors",
    ]
