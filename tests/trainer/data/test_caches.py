"""The prompt-embedding and VAE-latent caches, on the tiny random-weight model.

One safetensors file per sample and cache, named after the sample. A cache pass encodes only
the samples whose inputs changed (caption, images, sizes, model), leaves the others alone and
deletes the files of samples that left the dataset. A damaged file is re-encoded, never read.

Most cases use edit-v2 with `match_target_res` (references VAE-encoded at the target's size,
so a pass takes well under a second on a CPU); one edit-v1 case covers its ~1 megapixel
reference and its default cache folder.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from trainer.config.parsing import parse_train_config
from trainer.data.caches import (
    SamplePaths,
    build_text_cache,
    build_vae_cache,
    iter_samples,
    sample_paths,
    stored_fingerprint,
    text_fingerprint,
    vae_fingerprint,
)
from trainer.data.dataset_config import parse_dataset_config
from trainer.data.images import bucket_size
from trainer.data.pairing import build_manifest
from trainer.demo.dataset import generate_demo_dataset
from trainer.demo.tiny_model import JOINT_DIM, Z_DIM, build_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
IMAGE_SIZE = 32  # demo images are 32 x 32 ...
RESOLUTION = 64  # ... and train in a 64 x 64 bucket: latents 8 x 8
NAMES = ["0000", "0001", "0002", "0003"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def tiny_edit_v2(tiny_models) -> Path:
    return build_tiny_pipeline(tiny_models / "tiny-edit-v2", flavour="edit-v2")


@dataclass
class Project:
    """A 4-sample edit-v2 dataset with two references per sample and its caches under `root`."""

    root: Path
    model: Path
    references: tuple[str, ...] = ("reference", "reference_2")
    resolution: int = RESOLUTION
    loose: tuple[str, ...] = ()  # conditioning datasets with conditioning_type reference_loose (others: strict)

    def __post_init__(self):
        self.demo = generate_demo_dataset(self.root / "data", n_train=4, n_eval=1, size=IMAGE_SIZE)
        self.config = parse_train_config(
            {"model_flavour": "edit-v2", "pretrained_model_name_or_path": str(self.model), "model_kwargs": {"match_target_res": True}}
        )
        self.text_dir = self.root / "cache" / "text" / "edits"  # text_embeds cache_dir / dataset id
        self.vae_dir = self.root / "cache" / "vae" / "edits"

    @property
    def dataset_config(self):
        entries = [
            {
                "id": "edits",
                "instance_data_dir": str(self.folder("edited")),
                "resolution": self.resolution,
                "conditioning_data": list(self.references),
                "cache_dir_vae": str(self.vae_dir),
            },
            *(
                {
                    "id": name,
                    "dataset_type": "conditioning",
                    "instance_data_dir": str(self.folder(name)),
                    "conditioning_type": "reference_loose" if name in self.loose else "reference_strict",
                }
                for name in ("reference", "reference_2")
            ),
            {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "cache_dir": str(self.root / "cache" / "text")},
        ]
        return parse_dataset_config(entries, "multidatabackend.json", self.config.flavour, self.root)

    def folder(self, name: str) -> Path:
        return self.demo.folder("train", name)

    def manifest(self):
        """Re-scanned every time, as each stage of a run does."""
        return build_manifest(self.dataset_config, self.config.flavour)[0]

    def build(self):
        """One cache pass of both caches: (text stats, VAE stats)."""
        manifest, data = self.manifest(), self.dataset_config
        return build_text_cache(manifest, data, self.config, CPU), build_vae_cache(manifest, data, self.config, CPU)

    def build_vae(self):
        """A pass of the VAE cache alone (the cheap one), for cases about the latents."""
        return build_vae_cache(self.manifest(), self.dataset_config, self.config, CPU)


def identities(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) per cache file: a rewrite (temp file + rename) changes both."""
    return {p.stem: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def rewritten(before: dict, after: dict) -> set[str]:
    return {name for name in after if before.get(name) != after[name]}


def counts(stats) -> tuple[int, int, int]:
    return stats.encoded, stats.reused, stats.pruned


@pytest.fixture(scope="module")
def first_pass(tmp_path_factory, tiny_edit_v2):
    """A project's first cache pass, run once for the module: (project, text stats, VAE stats).
    Tests only read it; those that change things work on a copy (`cached`)."""
    project = Project(tmp_path_factory.mktemp("first-pass") / "project", tiny_edit_v2)
    return (project, *project.build())


@pytest.fixture
def cached(first_pass, tmp_path, tiny_edit_v2) -> Project:
    """A private copy of a project whose caches are complete. Cache files hold no paths (their
    fingerprints are of contents), so a copied project's caches stay valid."""
    shutil.copytree(first_pass[0].root, tmp_path / "project")
    return Project(tmp_path / "project", tiny_edit_v2)


# --- what a pass writes ---------------------------------------------------------------------------


def test_a_first_pass_writes_one_file_per_sample_with_the_pipelines_tensors(first_pass):
    project, text, vae = first_pass
    assert counts(text) == counts(vae) == (4, 0, 0)
    assert text.folders == (str(project.text_dir),) and vae.folders == (str(project.vae_dir),)
    # exactly one file per sample, named after it, and no temp file left behind
    assert sorted(p.name for p in project.text_dir.iterdir()) == [f"{n}.safetensors" for n in NAMES]
    assert sorted(p.name for p in project.vae_dir.iterdir()) == [f"{n}.safetensors" for n in NAMES]

    width, height = bucket_size(IMAGE_SIZE, IMAGE_SIZE, RESOLUTION, "pixel_area")
    latent = (Z_DIM, height // 8, width // 8)
    assert latent == (16, 8, 8)
    for name in NAMES:
        prompt = load_file(str(project.text_dir / f"{name}.safetensors"))
        assert set(prompt) == {"prompt_embeds", "prompt_embeds_mask"}
        tokens = prompt["prompt_embeds"].shape[0]
        assert prompt["prompt_embeds"].shape == (tokens, JOINT_DIM) and tokens > 0
        assert prompt["prompt_embeds_mask"].shape == (tokens,) and prompt["prompt_embeds_mask"].sum() > 0
        assert torch.isfinite(prompt["prompt_embeds"]).all()

        latents = load_file(str(project.vae_dir / f"{name}.safetensors"))
        assert set(latents) == {"target", "reference_0", "reference_1"}  # one per conditioning dataset
        for key, tensor in latents.items():
            assert tuple(tensor.shape) == latent, key  # match_target_res: references at the target's size
            assert torch.isfinite(tensor).all()


def test_cached_samples_load_with_their_references_in_conditioning_order(cached):
    samples = list(iter_samples(cached.manifest(), cached.dataset_config, cached.config))
    assert [s.name for s in samples] == NAMES
    assert all(len(s.references) == 2 for s in samples)
    first = samples[0]
    assert first.prompt_embeds.shape[1] == JOINT_DIM and first.target.shape == (16, 8, 8)

    # swap the order of the conditioning datasets: the reference latents swap with it
    cached.references = ("reference_2", "reference")
    assert counts(cached.build_vae()) == (4, 0, 0)  # a new order is a new input
    swapped = next(iter_samples(cached.manifest(), cached.dataset_config, cached.config))
    assert torch.allclose(swapped.references[0], first.references[1])
    assert torch.allclose(swapped.references[1], first.references[0])
    assert torch.allclose(swapped.target, first.target)


def test_each_file_records_the_fingerprint_of_its_inputs(cached):
    manifest, data = cached.manifest(), cached.dataset_config
    row = manifest.iloc[0]
    paths = sample_paths(data, cached.config, row)
    assert paths.text == cached.text_dir / "0000.safetensors" and paths.vae == cached.vae_dir / "0000.safetensors"
    assert stored_fingerprint(paths.text) == text_fingerprint(cached.config, data, row)
    assert stored_fingerprint(paths.vae) == vae_fingerprint(cached.config, data, row)
    assert stored_fingerprint(cached.root / "nothing-here.safetensors") is None


# --- incremental passes ---------------------------------------------------------------------------


def test_a_second_pass_encodes_nothing_and_rewrites_nothing(cached):
    before = identities(cached.text_dir), identities(cached.vae_dir)
    text, vae = cached.build()
    assert counts(text) == counts(vae) == (0, 4, 0)
    assert (identities(cached.text_dir), identities(cached.vae_dir)) == before


def test_changing_one_caption_re_encodes_exactly_that_prompt_and_no_latents(cached):
    before_text, before_vae = identities(cached.text_dir), identities(cached.vae_dir)
    old = load_file(str(cached.text_dir / "0002.safetensors"))["prompt_embeds"]
    (cached.folder("edited") / "0002.txt").write_text("make the shape bright purple\n")
    text, vae = cached.build()
    assert counts(text) == (1, 3, 0) and counts(vae) == (0, 4, 0)
    assert rewritten(before_text, identities(cached.text_dir)) == {"0002"}
    assert rewritten(before_vae, identities(cached.vae_dir)) == set()
    new = load_file(str(cached.text_dir / "0002.safetensors"))["prompt_embeds"]
    assert new.shape != old.shape or not torch.equal(new, old)  # really encoded from the new caption


def test_replacing_one_reference_image_re_encodes_that_sample_in_both_caches(cached):
    before_text, before_vae = identities(cached.text_dir), identities(cached.vae_dir)
    old = load_file(str(cached.vae_dir / "0001.safetensors"))
    Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0)).save(cached.folder("reference_2") / "0001.png")  # a new swatch
    text, vae = cached.build()
    assert counts(text) == counts(vae) == (1, 3, 0)
    assert rewritten(before_text, identities(cached.text_dir)) == {"0001"}
    assert rewritten(before_vae, identities(cached.vae_dir)) == {"0001"}
    new = load_file(str(cached.vae_dir / "0001.safetensors"))
    assert not torch.equal(new["reference_1"], old["reference_1"])
    assert torch.equal(new["reference_0"], old["reference_0"]) and torch.equal(new["target"], old["target"])


def test_deleting_a_sample_prunes_exactly_its_cache_files(cached):
    for folder in ("edited", *cached.references):
        (cached.folder(folder) / "0003.png").unlink()
    (cached.folder("edited") / "0003.txt").unlink()
    before_text, before_vae = identities(cached.text_dir), identities(cached.vae_dir)
    text, vae = cached.build()
    assert counts(text) == counts(vae) == (0, 3, 1)
    for folder, before in ((cached.text_dir, before_text), (cached.vae_dir, before_vae)):
        after = identities(folder)
        assert sorted(after) == NAMES[:3]
        assert rewritten(before, after) == set()


def test_changing_the_dataset_resolution_re_encodes_every_latent_at_the_new_bucket(cached):
    cached.resolution = 32
    assert counts(cached.build_vae()) == (4, 0, 0)
    latents = load_file(str(cached.vae_dir / "0000.safetensors"))
    assert latents["target"].shape == latents["reference_0"].shape == (16, 4, 4)  # 32 px / 8


def test_a_strict_reference_is_cropped_to_its_targets_aspect_ratio_at_full_resolution_and_a_loose_one_is_left_alone(cached):
    """reference_strict: the target's framing (a centred crop), no resizing; the pipeline's own
    reference preparation does that afterwards, as at inference."""
    from trainer.data.caches import load_references

    wide = np.random.default_rng(0).integers(0, 255, (2 * IMAGE_SIZE, 2 * IMAGE_SIZE + 1, 3), dtype=np.uint8)
    Image.fromarray(wide).save(cached.folder("reference") / "0000.png")  # 1.6% wider than its 32 x 32 target
    row = cached.manifest().iloc[0]
    assert row["name"] == "0000"

    strict = load_references(cached.dataset_config, cached.config, row)
    # the square bucket's aspect ratio at each reference's own size: 64 x 65 -> 64 x 64, 32 x 32 kept
    assert [image.size for image in strict] == [(2 * IMAGE_SIZE, 2 * IMAGE_SIZE), (IMAGE_SIZE, IMAGE_SIZE)]
    cropped = np.asarray(strict[0])
    assert any(np.array_equal(cropped, wide[:, left : left + 2 * IMAGE_SIZE]) for left in (0, 1))  # one column off, no rescale

    cached.loose = ("reference",)
    loose = load_references(cached.dataset_config, cached.config, row)
    assert [image.size for image in loose] == [(2 * IMAGE_SIZE + 1, 2 * IMAGE_SIZE), (IMAGE_SIZE, IMAGE_SIZE)]
    assert np.array_equal(np.asarray(loose[0]), wide)
    assert counts(cached.build_vae()) == (4, 0, 0)  # how references are prepared is part of every cache key


def test_crop_to_aspect_takes_the_largest_centred_box_of_that_ratio():
    from trainer.data.images import crop_to_aspect

    pixels = np.arange(40 * 30 * 3, dtype=np.uint32).reshape(30, 40, 3).astype(np.uint8)
    image = Image.fromarray(pixels)  # 40 wide, 30 high
    assert np.array_equal(np.asarray(crop_to_aspect(image, 64, 64)), pixels[:, 5:35])  # sides trimmed
    assert np.array_equal(np.asarray(crop_to_aspect(image, 64, 96)), pixels[:, 10:30])  # 2:3 -> 20 x 30
    assert np.array_equal(np.asarray(crop_to_aspect(image, 128, 64)), pixels[5:25])  # 2:1 -> 40 x 20
    assert crop_to_aspect(image, 160, 120).size == (40, 30)  # same ratio: untouched


# --- the cache holds what the pipeline computes -----------------------------------------------------


def first_transformer_call(model: Path, flavour: str, references: list, prompt: str, width: int, height: int) -> dict:
    """What a real `pipeline(...)` call (no CFG) passes to its transformer at the first step."""
    from tests.trainer.test_parity import transformer_calls
    from trainer.model.loading import load_pipeline

    def stop_after_the_first_step(pipe, step, timestep, callback_kwargs):
        pipe._interrupt = True  # the pipeline's own early exit: the remaining steps are skipped
        return callback_kwargs

    config = parse_train_config({"model_flavour": flavour, "pretrained_model_name_or_path": str(model)})
    pipe = load_pipeline(config, CPU, torch.float32)
    with transformer_calls(pipe.transformer) as calls, torch.no_grad():
        pipe(
            image=references, prompt=prompt, width=width, height=height, num_inference_steps=2, true_cfg_scale=1.0,
            generator=torch.Generator().manual_seed(0), output_type="latent",
            callback_on_step_end=stop_after_the_first_step,
        )
    assert len(calls) == 1
    return calls[0]


def assert_sample_is_the_pipelines_input(sample, call: dict) -> None:
    """Prompt embeddings, mask, reference tokens (after the target's) and img_shapes, bit for bit."""
    from tests.trainer.test_parity import EXACT, assert_same_mask, expected_mask
    from trainer.model.conditioning import img_shapes, pack

    torch.testing.assert_close(call["encoder_hidden_states"], sample.prompt_embeds[None], **EXACT)
    assert_same_mask(call["encoder_hidden_states_mask"], expected_mask(sample.prompt_embeds_mask))
    target_tokens = sample.target.shape[-2] * sample.target.shape[-1] // 4
    references = torch.cat([pack(latent[None]) for latent in sample.references], dim=1)
    torch.testing.assert_close(call["hidden_states"][:, target_tokens:], references, **EXACT)
    assert [list(s) for s in call["img_shapes"]] == [list(s) for s in img_shapes(sample.target, sample.references)]


def test_a_strict_reference_trains_on_what_the_pipeline_makes_of_the_full_resolution_reference(cached, tiny_edit_v2, monkeypatch):
    """A 260 x 256 reference of a target in a 64 x 64 bucket: the caches hold exactly what
    QwenImageEditPlusPipeline computes from the reference centre-cropped to 256 x 256 (VL encoder at
    ~384², VAE at VAE_IMAGE_SIZE), not from a 64 x 64 copy scaled back up.

    VAE_IMAGE_SIZE (~1 MP) is lowered to 192² for the cache and the pipeline alike (both read the
    module's constant): a 1 MP encode costs seconds on the tiny VAE and proves nothing more here."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 192 * 192)
    cached.config = parse_train_config({"model_flavour": "edit-v2", "pretrained_model_name_or_path": str(tiny_edit_v2)})
    cached.references = ("reference",)
    reference = np.random.default_rng(1).integers(0, 256, (256, 260, 3), dtype=np.uint8)
    Image.fromarray(reference).save(cached.folder("reference") / "0000.png")
    row = cached.manifest().head(1)
    assert row.iloc[0]["name"] == "0000" and row.iloc[0]["n_references"] == 1
    build_text_cache(row, cached.dataset_config, cached.config, CPU)
    build_vae_cache(row, cached.dataset_config, cached.config, CPU)
    (sample,) = iter_samples(row, cached.dataset_config, cached.config)
    assert sample.target.shape == (16, 8, 8) and sample.references[0].shape == (16, 24, 24)  # 192 / 8

    cropped = Image.fromarray(reference[:, 2:258])  # the centred 256 x 256
    call = first_transformer_call(tiny_edit_v2, "edit-v2", [cropped], row.iloc[0]["caption"], RESOLUTION, RESOLUTION)
    assert_sample_is_the_pipelines_input(sample, call)


def test_match_target_res_keeps_each_references_aspect_ratio_at_the_targets_area(cached):
    """A 2:1 reference of a target in a 128 x 128 bucket enters the VAE at 192 x 96 (the target's
    area, sides multiple of 32, as calculate_dimensions rounds), not stretched to 128 x 128."""
    cached.loose = ("reference",)
    cached.resolution = 128
    Image.new("RGB", (4 * IMAGE_SIZE, 2 * IMAGE_SIZE), (200, 30, 30)).save(cached.folder("reference") / "0000.png")
    build_vae_cache(cached.manifest().head(1), cached.dataset_config, cached.config, CPU)
    latents = load_file(str(cached.vae_dir / "0000.safetensors"))
    assert latents["target"].shape == (16, 16, 16)  # 128 x 128
    assert latents["reference_0"].shape == (16, 96 // 8, 192 // 8)  # 2:1 kept, 18432 px ~ 128²
    assert latents["reference_1"].shape == (16, 16, 16)  # square stays square


def test_match_target_res_trains_on_what_the_pipeline_sees_with_vae_image_size_at_the_targets_area(cached, tiny_edit_v2, monkeypatch):
    """README's recipe for inference with a match_target_res LoRA: QwenImageEditPlusPipeline with
    its module's VAE_IMAGE_SIZE set to the output's area feeds the transformer exactly the cached
    conditioning (a 2:1 loose reference and a square strict one)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    cached.loose = ("reference",)
    cached.resolution = 128
    wide = np.random.default_rng(2).integers(0, 256, (2 * IMAGE_SIZE, 4 * IMAGE_SIZE, 3), dtype=np.uint8)
    Image.fromarray(wide).save(cached.folder("reference") / "0000.png")
    row = cached.manifest().head(1)
    build_text_cache(row, cached.dataset_config, cached.config, CPU)
    build_vae_cache(row, cached.dataset_config, cached.config, CPU)
    (sample,) = iter_samples(row, cached.dataset_config, cached.config)

    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 128 * 128)
    references = [Image.fromarray(wide), Image.open(cached.folder("reference_2") / "0000.png").convert("RGB")]
    call = first_transformer_call(tiny_edit_v2, "edit-v2", references, row.iloc[0]["caption"], 128, 128)
    assert_sample_is_the_pipelines_input(sample, call)


def test_a_cached_sample_equals_a_fresh_encode_of_its_files(first_pass):
    """Values, not only shapes: each sample loaded from the caches equals its caption, target and
    references encoded afresh with the tiny pipeline (trainer.model.conditioning, which
    tests/trainer/test_parity.py holds against the pipelines)."""
    from trainer.data.images import load_rgb
    from trainer.data.pairing import reference_paths
    from trainer.model.conditioning import encode_image_latents, encode_prompt, prepare_references, preprocess_target
    from trainer.model.loading import load_pipeline

    project = first_pass[0]
    manifest = project.manifest()
    pipe = load_pipeline(project.config, CPU, torch.float32, transformer=False)
    bucket = (RESOLUTION, RESOLUTION)
    samples = list(iter_samples(manifest, project.dataset_config, project.config))
    assert [s.name for s in samples] == NAMES
    for sample, row in zip(samples, manifest.to_dict("records"), strict=True):
        refs = prepare_references(pipe, project.config.flavour, [load_rgb(p) for p in reference_paths(row)], bucket)
        embeds, mask = encode_prompt(pipe, project.config.flavour, row["caption"], refs)
        target = encode_image_latents(pipe, preprocess_target(pipe, load_rgb(row["target_path"]), bucket))
        assert torch.equal(sample.prompt_embeds, embeds) and torch.equal(sample.prompt_embeds_mask, mask), row["name"]
        assert torch.equal(sample.target, target), row["name"]
        assert len(sample.references) == len(refs.vae_images) == 2
        for cached_latent, image in zip(sample.references, refs.vae_images):
            assert torch.equal(cached_latent, encode_image_latents(pipe, image)), row["name"]
    # the samples differ from one another, so a file read for the wrong sample would show
    assert not torch.equal(samples[0].target, samples[1].target)


# --- damaged files --------------------------------------------------------------------------------


def test_a_truncated_or_garbage_cache_file_is_stale_and_re_encoded_never_loaded(cached):
    garbage = cached.vae_dir / "0000.safetensors"
    garbage.write_bytes(b"\x00\x01garbage from a killed write")
    truncated = cached.text_dir / "0001.safetensors"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    assert stored_fingerprint(garbage) is None and stored_fingerprint(truncated) is None

    before_text, before_vae = identities(cached.text_dir), identities(cached.vae_dir)
    text, vae = cached.build()  # would raise if it tried to read either file
    assert counts(text) == counts(vae) == (1, 3, 0)
    assert rewritten(before_text, identities(cached.text_dir)) == {"0001"}
    assert rewritten(before_vae, identities(cached.vae_dir)) == {"0000"}
    for path in (garbage, truncated):
        with safe_open(str(path), framework="pt") as handle:
            assert handle.metadata()["fingerprint"]
    assert len(list(iter_samples(cached.manifest(), cached.dataset_config, cached.config))) == 4


# --- edit-v1 --------------------------------------------------------------------------------------


def test_edit_v1_caches_its_one_reference_at_one_megapixel_in_the_default_folders(tmp_path, tiny_models):
    model = build_tiny_pipeline(tiny_models / "tiny-edit-v1", flavour="edit-v1")
    demo = generate_demo_dataset(tmp_path / "data", n_train=1, n_eval=0, size=IMAGE_SIZE)
    config = parse_train_config({"model_flavour": "edit-v1", "pretrained_model_name_or_path": str(model)})
    entries = [
        {"id": "edits", "instance_data_dir": str(demo.folder("train", "edited")), "resolution": RESOLUTION, "conditioning_data": ["reference"]},
        {"id": "reference", "dataset_type": "conditioning", "instance_data_dir": str(demo.folder("train", "reference"))},
    ]
    data = parse_dataset_config(entries, "multidatabackend.json", config.flavour, tmp_path)
    manifest, _ = build_manifest(data, config.flavour)

    text, vae = build_text_cache(manifest, data, config, CPU), build_vae_cache(manifest, data, config, CPU)
    assert counts(text) == counts(vae) == (1, 0, 0)
    embeds_file = tmp_path / "cache" / "conditioning_image_embeds" / "edits" / "0000.safetensors"  # SPEC §4 default
    latents_file = tmp_path / "cache" / "vae" / "edits" / "0000.safetensors"
    assert sample_paths(data, config, manifest.iloc[0]) == SamplePaths(text=embeds_file, vae=latents_file)

    prompt = load_file(str(embeds_file))
    tokens = prompt["prompt_embeds"].shape[0]
    assert prompt["prompt_embeds"].shape == (tokens, JOINT_DIM) and prompt["prompt_embeds_mask"].shape == (tokens,)
    # the VL encoder sees the reference at ~1 MP: about (1024 / 28)^2 merged image tokens
    assert tokens > (1024 // 28) ** 2

    latents = load_file(str(latents_file))
    assert set(latents) == {"target", "reference_0"}
    assert latents["target"].shape == (16, 8, 8)  # the target at its bucket
    assert latents["reference_0"].shape == (16, 128, 128)  # the reference at 1024 x 1024, as QwenImageEditPipeline

    text, vae = build_text_cache(manifest, data, config, CPU), build_vae_cache(manifest, data, config, CPU)
    assert counts(text) == counts(vae) == (0, 1, 0)


def test_touching_a_file_without_changing_it_encodes_nothing_and_refreshes_the_shortcut(cached):
    import os

    from trainer.data.caches import stored_metadata

    target = cached.folder("edited") / "0001.png"
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    quick_before = stored_metadata(cached.vae_dir / "0001.safetensors")["quick"]
    text, vae = cached.build()
    assert counts(text) == counts(vae) == (0, 4, 0)  # contents hashed, found equal: nothing encoded
    assert stored_metadata(cached.vae_dir / "0001.safetensors")["quick"] != quick_before  # shortcut now matches
    after_refresh = identities(cached.vae_dir)
    cached.build()
    assert identities(cached.vae_dir) == after_refresh
