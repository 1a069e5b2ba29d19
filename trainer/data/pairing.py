"""The pairing manifest: one row per training sample, proven sound before any GPU time is spent.

Every target image must have a same-named file in each of its conditioning datasets, a
caption per its caption strategy, and every file must be a readable image. The checks are a
pandera DataFrameModel validated lazily, so a failure lists *every* offending file at once.
"""

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
import pandera.pandas as pa
from pandera.typing import Series

from trainer.data.dataset_config import DatasetConfig, DatasetEntry, TrainingSet
from trainer.data.images import IMAGE_SUFFIXES, alpha_note, image_size_measure, is_image_file, probe_image, probe_images
from trainer.errors import DataError
from trainer.model.flavours import MAX_REFERENCES, Flavour

ASPECT_TOLERANCE = 0.02  # reference_strict: |log(aspect ratio / target's)| above this is an error
IGNORED_SUFFIXES = {".txt", ".json", ".jsonl", ".csv", ".md"}

# reference_1..3 are in every manifest; reference_4..10 only where the flavour takes more (edit-2.1),
# so the edit-v1/v2/v3 manifests (and their data versions) stay as they were
BASE_REFERENCES = 3
REFERENCE_COLUMNS = tuple(f"reference_{i}" for i in range(1, MAX_REFERENCES + 1))


MASK_COLUMN = "mask_path"


def reference_columns(flavour: Flavour) -> tuple[str, ...]:
    """The manifest's reference columns for `flavour`."""
    return REFERENCE_COLUMNS[: max(BASE_REFERENCES, flavour.max_references)]


class PairingManifestModel(pa.DataFrameModel):
    """What a sound manifest looks like; each check's name keys its message in the report."""

    split: Series[str] = pa.Field(isin=["train", "eval"])
    dataset_id: Series[str]
    name: Series[str]
    target_path: Series[str]
    caption: Series[str] = pa.Field(nullable=False)
    n_references: Series[int] = pa.Field(ge=1, le=MAX_REFERENCES)
    target_width: Series[int] = pa.Field(ge=0)  # after EXIF orientation; 0 when unreadable
    target_height: Series[int] = pa.Field(ge=0)
    reference_1: Series[str] = pa.Field(nullable=True)
    reference_2: Series[str] = pa.Field(nullable=True)
    reference_3: Series[str] = pa.Field(nullable=True)
    # edit-2.1's further references: columns of its manifests only
    reference_4: Optional[Series[str]] = pa.Field(nullable=True)
    reference_5: Optional[Series[str]] = pa.Field(nullable=True)
    reference_6: Optional[Series[str]] = pa.Field(nullable=True)
    reference_7: Optional[Series[str]] = pa.Field(nullable=True)
    reference_8: Optional[Series[str]] = pa.Field(nullable=True)
    reference_9: Optional[Series[str]] = pa.Field(nullable=True)
    reference_10: Optional[Series[str]] = pa.Field(nullable=True)
    # the loss mask (a `conditioning_type: mask` dataset): a column only of manifests with masks
    mask_path: Optional[Series[str]] = pa.Field(nullable=True)

    @pa.check("target_path", *REFERENCE_COLUMNS, MASK_COLUMN, element_wise=True, name="readable_image")
    def _readable(cls, path) -> bool:
        return path is None or pd.isna(path) or probe_image(path).error is None

    @pa.check("caption", element_wise=True, name="caption_present")
    def _caption(cls, caption) -> bool:
        return isinstance(caption, str) and caption.strip() != ""

    @pa.dataframe_check(name="unique_sample")
    def _unique(cls, df: pd.DataFrame) -> pd.Series:
        return ~df.duplicated(["dataset_id", "name"], keep=False)

    class Config:
        strict = True
        coerce = False


@dataclass
class PairingReport:
    """Errors block training; warnings (e.g. references with no target) are shown, not fatal."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        lines = ["| severity | problem |", "|---|---|"]
        lines += [f"| error | {e} |" for e in self.errors]
        lines += [f"| warning | {w} |" for w in self.warnings]
        return "\n".join(lines)


class PairingError(DataError):
    def __init__(self, report: PairingReport):
        self.report = report
        listing = "\n".join(f"  - {e}" for e in report.errors)
        super().__init__(f"the dataset has {len(report.errors)} problem(s); nothing was encoded or trained:\n{listing}")


@dataclass
class FolderScan:
    """One listing of a dataset folder (os.scandir, names sorted as strings: fast at 100k files)."""

    images: dict[str, str] = field(default_factory=dict)  # path by name without extension
    same_name: list[tuple[Path, Path]] = field(default_factory=list)  # 0001.png + 0001.jpg
    case_twins: list[tuple[Path, Path]] = field(default_factory=list)  # Cat.png + cat.png
    others: list[Path] = field(default_factory=list)  # not images, not captions or metadata


def scan_folder(folder: Path) -> FolderScan:
    """Strings, not Path objects, in the loop: at 100k files pathlib's overhead dominates."""
    scan = FolderScan()
    by_lower: dict[str, str] = {}
    base = str(folder)
    with os.scandir(folder) as entries:
        files = sorted(e.name for e in entries if _is_file(e))
    for name in files:
        stem, suffix = os.path.splitext(name)
        path = os.path.join(base, name)
        if suffix.lower() not in IMAGE_SUFFIXES:
            if not name.startswith(".") and suffix.lower() not in IGNORED_SUFFIXES:
                scan.others.append(Path(path))
            continue
        if stem in scan.images:
            scan.same_name.append((Path(scan.images[stem]), Path(path)))
            continue
        lower = stem.lower()
        if lower in by_lower:
            scan.case_twins.append((Path(by_lower[lower]), Path(path)))
        else:
            by_lower[lower] = path
        scan.images[stem] = path
    return scan


def _is_file(entry: os.DirEntry) -> bool:
    """A symlink loop or an entry that cannot be stat'ed is listed: its probe then says why it is unusable."""
    try:
        return entry.is_file()
    except OSError:
        return True


def build_manifest(
    dataset_config: DatasetConfig, flavour: Flavour, eval_dataset_id: str | None = None
) -> tuple[pd.DataFrame, PairingReport]:
    """Scan every image dataset, pair files by name, validate; raise PairingError on any error."""
    rows: list[dict] = []
    report = PairingReport()
    columns = reference_columns(flavour)
    if any(dataset_config.training_set(e, flavour).mask is not None for e in dataset_config.image_entries):
        columns += (MASK_COLUMN,)
    for entry in dataset_config.image_entries:
        tset = dataset_config.training_set(entry, flavour)
        split = "eval" if entry.id == eval_dataset_id else "train"
        rows += _pair_dataset(tset, split, report, flavour, columns)
    if eval_dataset_id is not None:
        dataset_config.by_id(eval_dataset_id)  # a clear error when the id is wrong
    schema_columns = list(PairingManifestModel.to_schema().columns)
    optional = (*REFERENCE_COLUMNS, MASK_COLUMN)
    manifest = pd.DataFrame(rows, columns=[c for c in schema_columns if c not in optional or c in columns])
    for column in ("caption", *columns):
        manifest[column] = manifest[column].astype(object)
    for column in ("n_references", "target_width", "target_height"):
        manifest[column] = manifest[column].astype(int)
    report.errors += _validate(manifest)
    if not (manifest["split"] == "train").any() and not report.errors:
        report.errors.append("no training samples: every image dataset is empty or is the eval dataset")
    if report.errors:
        raise PairingError(report)
    return manifest.reset_index(drop=True), report


def _pair_dataset(tset: TrainingSet, split: str, report: PairingReport, flavour: Flavour, columns: tuple[str, ...]) -> list[dict]:
    entry = tset.target
    if not tset.target_dir.is_dir():
        report.errors.append(f"dataset {entry.id!r}: instance_data_dir {tset.target_dir} does not exist")
        return []
    scans = {}
    for folder in (tset.target_dir, *tset.reference_dirs, *([tset.mask_dir] if tset.mask_dir else [])):
        if folder.is_dir():
            try:
                scans[folder] = scan_folder(folder)
            except OSError as exc:
                report.errors.append(f"{folder}: cannot be listed ({exc.strerror or exc})")
                return []
    for scan in scans.values():
        for first, second in scan.same_name:
            report.errors.append(f"{first} and {second}: two images named {first.stem!r}; keep one (pairs are matched by name)")
    targets = scans[tset.target_dir].images
    probe_images([p for scan in scans.values() for p in scan.images.values()])
    reference_files = []
    for ref_entry, ref_dir in zip(tset.references, tset.reference_dirs):
        if not ref_dir.is_dir():
            report.errors.append(f"conditioning dataset {ref_entry.id!r}: instance_data_dir {ref_dir} does not exist")
            return []
        reference_files.append(scans[ref_dir].images)
    if tset.mask_dir is not None and not tset.mask_dir.is_dir():
        report.errors.append(f"mask dataset {tset.mask.id!r}: instance_data_dir {tset.mask_dir} does not exist")
        return []
    mask_files = scans[tset.mask_dir].images if tset.mask_dir is not None else None
    for ref_dir, files, what in [*zip(tset.reference_dirs, reference_files, ["reference"] * len(reference_files)),
                                 *([(tset.mask_dir, mask_files, "mask")] if mask_files is not None else [])]:
        orphans = sorted(set(files) - set(targets))
        for stem in orphans:
            report.warnings.append(f"{files[stem]}: {what} with no target image of the same name in {tset.target_dir}")
    rows = []
    for stem, target_path in sorted(targets.items()):
        if _below_minimum_size(entry, target_path, report):
            continue
        target_name = os.path.basename(target_path)
        references = [
            files.get(stem) or os.path.join(str(ref_dir), target_name) for files, ref_dir in zip(reference_files, tset.reference_dirs)
        ]
        references += [None] * (len([c for c in columns if c != MASK_COLUMN]) - len(references))
        masks = {MASK_COLUMN: mask_files.get(stem) or os.path.join(str(tset.mask_dir), target_name)} if mask_files is not None else {}
        rows.append(
            {
                "split": split,
                "dataset_id": entry.id,
                "name": stem,
                "target_path": target_path,
                "caption": read_caption(entry, target_path),
                "n_references": len(tset.references),
                "target_width": (probe := probe_image(target_path)).width,
                "target_height": probe.height,
                **dict(zip(columns, references)),
                **masks,
            }
        )
    _check_quality(tset, rows, scans, report, flavour)
    return rows


def _below_minimum_size(entry: DatasetEntry, target_path: str, report: PairingReport) -> bool:
    """SimpleTuner's minimum_image_size: smaller targets are left out, with a warning naming each."""
    if not entry.minimum_image_size:
        return False
    probe = probe_image(target_path)
    if probe.error is not None:
        return False
    size = image_size_measure(probe.width, probe.height, entry.resolution_type)
    if size >= entry.minimum_image_size:
        return False
    report.warnings.append(
        f"{target_path}: {probe.width}x{probe.height} is below minimum_image_size {entry.minimum_image_size:g} "
        f"({entry.resolution_type}) of dataset {entry.id!r}; left out"
    )
    return True


def _check_quality(tset: TrainingSet, rows: list[dict], scans: dict[Path, FolderScan], report: PairingReport, flavour: Flavour) -> None:
    """Beyond pairing: conversions done on load (transparency as the flavour's pipeline treats it),
    small images, strict references of another shape, odd files."""
    entry = tset.target
    for scan in scans.values():
        for first, second in scan.case_twins:
            report.errors.append(f"{first} and {second}: names differ only by letter case; rename one")
        for path in scan.others:
            report.warnings.append(f"{path}: not an image type ({path.suffix or 'no extension'}), ignored")
    for row in rows:
        target = probe_image(row["target_path"])
        for note in _notes(target, flavour, is_reference=False):
            report.warnings.append(f"{row['target_path']}: {note}")
        if target.error is None:
            bucket = entry.bucket(target.width, target.height)
            if target.width * target.height < 0.5 * bucket[0] * bucket[1]:
                report.warnings.append(
                    f"{row['target_path']}: {target.width}x{target.height} is well below the training size "
                    f"{bucket[0]}x{bucket[1]} (resolution {entry.resolution:g}); it will be upscaled"
                )
        for ref_entry, column in zip(tset.references, REFERENCE_COLUMNS):
            ref = probe_image(row[column])
            for note in _notes(ref, flavour, is_reference=True):
                report.warnings.append(f"{row[column]}: {note}")
            strict = ref_entry.conditioning_type == "reference_strict"
            if strict and ref.error is None and target.error is None and _aspect_gap(ref, target) > ASPECT_TOLERANCE:
                report.errors.append(
                    f"{row[column]}: {ref.width}x{ref.height} has another aspect ratio than its target "
                    f"{row['target_path']} ({target.width}x{target.height}); crop it to match, or set "
                    f"conditioning_type 'reference_loose' on dataset {ref_entry.id!r}"
                )
        if tset.mask is not None and target.error is None:
            mask = probe_image(row[MASK_COLUMN])
            if mask.error is None and (mask.width, mask.height) != (target.width, target.height):
                report.errors.append(
                    f"{row[MASK_COLUMN]}: {mask.width}x{mask.height}, but its target {row['target_path']} is "
                    f"{target.width}x{target.height}; a mask must be its target's size (mask dataset {tset.mask.id!r})"
                )


def _notes(probe, flavour: Flavour, is_reference: bool) -> tuple[str, ...]:
    return probe.notes + ((alpha_note(flavour.keeps_alpha, is_reference),) if probe.has_alpha else ())


def _aspect_gap(a, b) -> float:
    import math

    return abs(math.log((a.width / a.height) / (b.width / b.height)))


def _missing_hint(path: str) -> str:
    """Why a file is unusable, with a hint when a file of the same name in another case exists."""
    error = probe_image(path).error
    p = Path(path)
    if error == "missing file" and p.parent.is_dir():
        for other in p.parent.iterdir():
            if other.stem.lower() == p.stem.lower() and is_image_file(other):
                return f"missing file (found {other.name}: names must match exactly, including case)"
    return error


def read_caption(entry: DatasetEntry, target_path: str | Path) -> str | None:
    if entry.caption_strategy == "instanceprompt":
        return entry.instance_prompt
    stem = os.path.splitext(str(target_path))[0]
    if entry.caption_strategy == "filename":
        return os.path.basename(stem).replace("_", " ")
    try:
        with open(stem + ".txt", encoding="utf-8") as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError, ValueError):  # missing, a folder, unreadable, a symlink loop, not UTF-8
        return None


def _validate(manifest: pd.DataFrame) -> list[str]:
    try:
        PairingManifestModel.validate(manifest, lazy=True)
    except pa.errors.SchemaErrors as exc:
        return sorted(set(_describe_failures(exc.failure_cases, manifest)))
    return []


def _describe_failures(failures: pd.DataFrame, manifest: pd.DataFrame) -> Iterable[str]:
    for failure in failures.itertuples():
        check = str(failure.check)
        index = failure.index
        row = manifest.loc[index] if index is not None and index in manifest.index else None
        if check == "readable_image":
            what = "mask" if failure.column == MASK_COLUMN else "reference"
            yield f"{failure.failure_case}: {_missing_hint(failure.failure_case)}" + (
                f" ({what} for {row.target_path})" if row is not None and failure.column != "target_path" else ""
            )
        elif check == "caption_present" or (failure.column == "caption" and row is not None):
            yield f"{Path(row.target_path).with_suffix('.txt')}: caption missing, empty or not UTF-8 (caption_strategy textfile)"
        elif check == "unique_sample" and row is not None:
            yield f"{row.target_path}: two target images share the name {row['name']!r} in dataset {row.dataset_id!r}"
        else:
            where = f"row {index}" if row is None else row.target_path
            yield f"{where}: column {failure.column!r} failed {check} with {failure.failure_case!r}"


def reference_paths(row) -> list[str]:
    """The row's reference files, in conditioning-dataset order."""
    return [row[c] for c in REFERENCE_COLUMNS[: int(row["n_references"])]]


def write_manifest(manifest: pd.DataFrame, path: Path) -> Path:
    from trainer.io import atomic_write_text

    atomic_write_text(path, manifest.to_json(orient="records", indent=1))
    return path


def read_manifest(path: Path) -> pd.DataFrame:
    manifest = pd.read_json(path, orient="records", dtype=False)
    for column in ("caption", *(c for c in (*REFERENCE_COLUMNS, MASK_COLUMN) if c in manifest.columns)):
        manifest[column] = manifest[column].astype(object).where(manifest[column].notna(), None)
    return manifest
