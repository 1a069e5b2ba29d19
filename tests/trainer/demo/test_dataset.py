"""The demo dataset: recolour one shape on a grey background, with 3 reference images.

Facts are read back from the written files (not from the generator's internals), so these tests
describe what a training run will see on disk.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.demo import dataset as demo_data
from trainer.demo.dataset import PALETTE, REFERENCE_FOLDERS, SHAPES, generate_demo_dataset
from trainer.errors import DataError

FOLDERS = ("edited", *REFERENCE_FOLDERS)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "data")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def samples(dataset, split):
    """(stem, target, reference 1, swatch, mask, caption) for every sample of a split."""
    for png in sorted(dataset.folder(split, "edited").glob("*.png")):
        stem = png.stem
        target, ref1, swatch, silhouette = (pixels(dataset.folder(split, f) / png.name) for f in FOLDERS)
        caption = (dataset.folder(split, "edited") / f"{stem}.txt").read_text(encoding="utf-8")
        yield stem, target, ref1, swatch, silhouette.max(axis=2) > 127, caption


def colour_name(rgb) -> str:
    """The palette name of an exact palette colour."""
    names = [name for name, value in PALETTE.items() if tuple(value) == tuple(int(c) for c in rgb)]
    assert len(names) == 1, f"{tuple(rgb)} is not a palette colour"
    return names[0]


def shape_name(mask: np.ndarray) -> str:
    """Classify a silhouette by how much of its bounding box it fills (1, pi/4 or 1/2)."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_has_the_same_file_names_in_every_folder(dataset):
    assert dataset.train_dir == dataset.root / "train" and dataset.eval_dir == dataset.root / "eval"
    for split, n in (("train", dataset.n_train), ("eval", dataset.n_eval)):
        expected = [f"{i:04d}.png" for i in range(n)]
        for folder in FOLDERS:
            names = sorted(p.name for p in dataset.folder(split, folder).glob("*.png"))
            assert names == expected, (split, folder)
    assert (dataset.root / "demo_dataset.json").is_file()


def test_images_are_rgb_squares_of_the_requested_size(dataset):
    for split in ("train", "eval"):
        for folder in FOLDERS:
            for png in dataset.folder(split, folder).glob("*.png"):
                with Image.open(png) as image:
                    assert (image.mode, image.size) == ("RGB", (dataset.size, dataset.size))


def test_caption_names_the_target_colour_and_the_shape(dataset):
    for split in ("train", "eval"):
        for stem, target, _, _, mask, caption in samples(dataset, split):
            words = caption.split()
            target_colour = colour_name(target[mask][0])
            assert [w for w in words if w in PALETTE] == [target_colour], (stem, caption)
            assert [w for w in words if w in SHAPES] == [shape_name(mask)], (stem, caption)


def test_the_edit_recolours_the_shape_and_nothing_else(dataset):
    for split in ("train", "eval"):
        for stem, target, ref1, _, mask, _ in samples(dataset, split):
            assert 0 < mask.sum() < mask.size, stem
            assert np.array_equal(target[~mask], ref1[~mask]), f"{stem}: background changed"
            background = ref1[~mask]
            assert (background == background[0]).all() and len(set(background[0])) == 1  # flat grey
            assert background[0][0] >= 200  # light
            # inside the shape: one palette colour before, another one after
            assert (target[mask] == target[mask][0]).all() and (ref1[mask] == ref1[mask][0]).all()
            assert colour_name(ref1[mask][0]) != colour_name(target[mask][0]), stem


def test_reference_2_is_a_uniform_swatch_of_the_target_colour(dataset):
    for split in ("train", "eval"):
        for stem, target, _, swatch, mask, _ in samples(dataset, split):
            assert (swatch == target[mask][0]).all(), stem


def test_reference_3_is_a_black_and_white_silhouette(dataset):
    for split in ("train", "eval"):
        for png in dataset.folder(split, "reference_3").glob("*.png"):
            assert set(np.unique(pixels(png))) <= {0, 255}, png


def test_scenes_vary_and_eval_never_repeats_a_train_scene(dataset):
    def silhouettes(split):
        return [mask.tobytes() for *_, mask, _ in samples(dataset, split)]

    train, held_out = silhouettes("train"), silhouettes("eval")
    assert len(set(train)) == len(train) and len(set(held_out)) == len(held_out)
    assert not set(train) & set(held_out)
    shapes = {shape_name(mask) for *_, mask, _ in samples(dataset, "train")}
    assert shapes == set(SHAPES)


def test_generation_is_deterministic(tmp_path):
    first = generate_demo_dataset(tmp_path / "a", n_train=5, n_eval=2, seed=3)
    second = generate_demo_dataset(tmp_path / "b", n_train=5, n_eval=2, seed=3)
    assert all_files(first.root) == all_files(second.root)
    other_seed = generate_demo_dataset(tmp_path / "c", n_train=5, n_eval=2, seed=4)
    assert all_files(other_seed.root) != all_files(first.root)


def test_a_second_call_with_the_same_parameters_rewrites_nothing(tmp_path):
    first = generate_demo_dataset(tmp_path / "data", n_train=3, n_eval=1)
    before = {p: p.stat().st_mtime_ns for p in first.root.rglob("*")}
    second = generate_demo_dataset(tmp_path / "data", n_train=3, n_eval=1)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in first.root.rglob("*")} == before


def test_overwrite_or_other_parameters_regenerate(tmp_path):
    root = tmp_path / "data"
    generate_demo_dataset(root, n_train=3, n_eval=1)
    stray = root / "train" / "edited" / "stray.png"
    stray.write_bytes(b"not written by the generator")
    generate_demo_dataset(root, n_train=3, n_eval=1, overwrite=True)
    assert not stray.exists()

    bigger = generate_demo_dataset(root, n_train=4, n_eval=1)
    assert len(list(bigger.folder("train", "reference_3").glob("*.png"))) == 4
    assert json.loads((root / "demo_dataset.json").read_text())["n_train"] == 4


def test_an_incomplete_leftover_is_replaced(tmp_path):
    root = tmp_path / "data"
    (root / "train" / "edited").mkdir(parents=True)
    (root / "train" / "edited" / "0000.png").write_bytes(b"half-written")  # no demo_dataset.json
    generate_demo_dataset(root, n_train=2, n_eval=1)
    assert all_files(root) == all_files(generate_demo_dataset(tmp_path / "fresh", n_train=2, n_eval=1).root)


def test_an_interrupted_generation_leaves_the_previous_dataset_and_no_temp_folder(tmp_path, monkeypatch):
    root = tmp_path / "data"
    generate_demo_dataset(root, n_train=2, n_eval=1)
    before = all_files(root)

    def crash(split_dir, scenes, size):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_data, "write_split", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_demo_dataset(root, n_train=5, n_eval=1)
    assert all_files(root) == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_refuses_to_delete_a_folder_that_is_not_a_demo_dataset(tmp_path):
    (tmp_path / "notes.md").write_text("keep me")
    with pytest.raises(DataError, match="notes.md"):
        generate_demo_dataset(tmp_path, n_train=2, n_eval=1)
    assert (tmp_path / "notes.md").read_text() == "keep me"


def test_folder_rejects_unknown_names(dataset):
    assert dataset.folder("eval", "reference_2") == dataset.root / "eval" / "reference_2"
    with pytest.raises(ValueError, match="valid: train, eval"):
        dataset.folder("test", "edited")
    with pytest.raises(ValueError, match="reference_3"):
        dataset.folder("train", "reference_4")
