"""The dataset config (`multidatabackend.json`): a list of typed entries, validated as a whole.

Entries are SimpleTuner's: `image` datasets hold edit targets (+ captions), `conditioning`
datasets hold references with matching file names, `conditioning_image_embeds` and
`text_embeds` entries name cache locations. SimpleTuner fields with no counterpart here are
accepted with a note when harmless (`trainer.config.simpletuner_keys`); the training config's
global `resolution`, `resolution_type`, `minimum_image_size` and `crop_aspect` are defaults
for entries that do not set their own.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainer.config.parsing import problems_message, read_json_with_comments, validate_model
from trainer.config.simpletuner_keys import DATASET_KEYS, translate
from trainer.config.value_checks import MAX_AREA_MEGAPIXELS, MAX_SIDE, no_bool_for_number, path_text, plain_name
from trainer.data.images import CropAspect, ResolutionType, bucket_size
from trainer.errors import ConfigError, suggest
from trainer.paths import resolved_folder
from trainer.model.flavours import Flavour

DatasetType = Literal["image", "conditioning", "conditioning_image_embeds", "text_embeds"]
CaptionStrategy = Literal["textfile", "filename", "instanceprompt"]

MAX_REPEATS = 10_000  # each repeat lists every sample once more in memory


class DatasetEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: str = Field(min_length=1, description="unique name of the entry; the default cache folders are named after it")
    type: Literal["local"] = Field("local", description="`local`: a folder on disk")
    dataset_type: DatasetType = Field(
        "image",
        description=(
            "`image`: edit targets (+ captions); `conditioning`: reference images named like their targets; "
            "`conditioning_image_embeds` (edit-v1) / `text_embeds` (edit-v2/v3/2.1): where prompt embeddings are "
            "cached"
        ),
    )
    disabled: bool = Field(False, description="leave the entry out")
    instance_data_dir: str | None = Field(None, description="folder of the images (image and conditioning datasets)")
    caption_strategy: CaptionStrategy = Field(
        "textfile",
        description=(
            "`textfile`: the caption in `name.txt` beside `name.png`; `filename`: the stem, `_` -> space; "
            "`instanceprompt`: `instance_prompt` for every image"
        ),
    )
    instance_prompt: str | None = Field(
        None,
        description="the caption of every image with caption_strategy `instanceprompt`",
    )
    resolution: float = Field(
        1024, gt=0,
        description="target size in `resolution_type`'s unit; sides are rounded to multiples of 32",
    )
    resolution_type: ResolutionType = Field(
        "pixel_area",
        description=(
            "`pixel_area`: area = resolution², aspect ratio kept; `area`: megapixels; `pixel`: the shorter "
            "edge"
        ),
    )
    minimum_image_size: float | None = Field(
        None, ge=0,
        description=(
            "in `resolution`'s unit (the shorter edge for `pixel`, √area for `pixel_area`, megapixels for "
            "`area`): smaller targets are left out, each named in a warning"
        ),
    )
    crop_aspect: CropAspect = Field(
        "preserve",
        description="`square`: every target centre-cropped square; `preserve` and `closest` keep the aspect ratio",
    )
    conditioning_data: list[str] | str | None = Field(
        None,
        description=(
            "on an image dataset: the id(s) of its conditioning datasets (edit-v1: one; edit-v2/v3: 1-3; "
            "edit-2.1: 1-10; one reference each)"
        ),
    )
    conditioning_image_embeds: str | None = Field(
        None,
        description=(
            "on an image dataset (edit-v1): id of the `conditioning_image_embeds` entry whose `cache_dir` "
            "holds its prompt embeddings (default `cache/conditioning_image_embeds/<id>`)"
        ),
    )
    conditioning_type: Literal["reference_strict", "reference_loose", "mask"] = Field(
        "reference_strict",
        description=(
            "on a conditioning dataset: `reference_strict` references are centre-cropped to their target's "
            "aspect ratio (within 2%) at their own resolution; `reference_loose` ones are used as they are; "
            "`mask`: a loss mask per target, same name and size (white trains, black is left out; see "
            "[Masked loss](#masked-loss)), not a reference"
        ),
    )
    conditioning_multidataset_sampling: Literal["combined", "random"] | None = Field(
        None,
        description=(
            "with several conditioning datasets: `combined` (all of them every step, as the pipeline "
            "conditions) or `random` (one per step, each with its own prompt embedding)"
        ),
        json_schema_extra={"shown_default": "`\"combined\"`"},
    )
    cache_dir_vae: str | None = Field(
        None,
        description="folder of the dataset's VAE-latent cache (default `cache/vae/<id>`)",
    )
    cache_dir: str | None = Field(
        None,
        description="on a `conditioning_image_embeds` or `text_embeds` entry: folder of the prompt-embedding cache",
    )
    default: bool = Field(
        False,
        description=(
            "SimpleTuner's mark of the default `text_embeds` entry; read without effect (the first enabled "
            "`text_embeds` entry with a `cache_dir` is used)"
        ),
    )
    repeats: int = Field(
        0, ge=0, le=MAX_REPEATS,
        description=(
            "each sample of the dataset is seen 1 + `repeats` times per epoch (weights one dataset against "
            "another)"
        ),
    )

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info) -> Any:
        return no_bool_for_number(cls, info.field_name, value)

    @field_validator("id")
    @classmethod
    def _id_is_a_folder_name(cls, value: str) -> str:
        return plain_name(value)

    @field_validator("instance_data_dir", "cache_dir_vae", "cache_dir")
    @classmethod
    def _openable_path(cls, value: str | None) -> str | None:
        return path_text(value)

    @model_validator(mode="after")
    def _sizes_within_bounds(self) -> "DatasetEntry":
        limit = MAX_AREA_MEGAPIXELS if self.resolution_type == "area" else MAX_SIDE
        for key in ("resolution", "minimum_image_size"):
            value = getattr(self, key)
            if value is not None and value > limit:
                raise ValueError(f"{key}={value:g} is beyond {limit:g} ({self.resolution_type}); training sizes stop at {MAX_SIDE} pixels a side")
        return self

    def bucket(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) a target of this dataset trains at."""
        return bucket_size(width, height, self.resolution, self.resolution_type, self.crop_aspect)

    @property
    def conditioning_ids(self) -> list[str]:
        if self.conditioning_data is None:
            return []
        return [self.conditioning_data] if isinstance(self.conditioning_data, str) else list(self.conditioning_data)


@dataclass(frozen=True)
class TrainingSet:
    """One image dataset with its conditioning datasets, resolved to absolute folders."""

    target: DatasetEntry
    target_dir: Path
    references: tuple[DatasetEntry, ...]
    reference_dirs: tuple[Path, ...]
    text_cache_dir: Path
    vae_cache_dir: Path
    sampling: Literal["combined", "random"]
    mask: DatasetEntry | None = None  # a `conditioning_type: mask` dataset in conditioning_data: the loss masks
    mask_dir: Path | None = None


@dataclass(frozen=True)
class DatasetConfig:
    entries: tuple[DatasetEntry, ...]
    source: str
    base_dir: Path
    notes: tuple[str, ...] = ()  # SimpleTuner fields read without effect
    _training_sets: dict = field(default_factory=dict, compare=False, repr=False)  # memo: hot in cache passes

    def by_id(self, dataset_id: str) -> DatasetEntry:
        for entry in self.entries:
            if entry.id == dataset_id:
                return entry
        raise ConfigError(
            f"{self.source}: no dataset with id {dataset_id!r}; {suggest(dataset_id, [e.id for e in self.entries])}"
        )

    def resolve(self, path: str) -> Path:
        """Relative paths resolve against the base directory (the working directory by default)."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def image_entries(self) -> list[DatasetEntry]:
        return [e for e in self.entries if e.dataset_type == "image" and not e.disabled]

    def training_set(self, entry: DatasetEntry, flavour: Flavour) -> TrainingSet:
        key = (entry.id, flavour.name)
        if key not in self._training_sets:
            self._training_sets[key] = self._build_training_set(entry, flavour)
        return self._training_sets[key]

    def _build_training_set(self, entry: DatasetEntry, flavour: Flavour) -> TrainingSet:
        linked = [self.by_id(ref_id) for ref_id in entry.conditioning_ids]
        refs = tuple(e for e in linked if e.conditioning_type != "mask")  # a mask dataset weights the loss instead
        mask = next((e for e in linked if e.conditioning_type == "mask"), None)
        default_sampling = "combined"
        sampling = entry.conditioning_multidataset_sampling or default_sampling
        return TrainingSet(
            target=entry,
            target_dir=self.resolve(entry.instance_data_dir),
            references=refs,
            reference_dirs=tuple(self.resolve(r.instance_data_dir) for r in refs),
            text_cache_dir=self._text_cache_dir(entry, flavour),
            vae_cache_dir=self.vae_cache_dir(entry),
            sampling=sampling,
            mask=mask,
            mask_dir=self.resolve(mask.instance_data_dir) if mask is not None else None,
        )

    def vae_cache_dir(self, entry: DatasetEntry) -> Path:
        return self.resolve(entry.cache_dir_vae or f"cache/vae/{entry.id}")

    def _text_cache_dir(self, entry: DatasetEntry, flavour: Flavour) -> Path:
        if entry.conditioning_image_embeds:
            return self.resolve(self.by_id(entry.conditioning_image_embeds).cache_dir or f"cache/conditioning_image_embeds/{entry.id}")
        if flavour.uses_conditioning_image_embeds:
            return self.resolve(f"cache/conditioning_image_embeds/{entry.id}")
        default = [e for e in self.entries if e.dataset_type == "text_embeds" and e.cache_dir and not e.disabled]
        base = self.resolve(default[0].cache_dir) if default else self.resolve("cache/text_embeds")
        return base / entry.id


def parse_dataset_config(
    raw: Any, source: str, flavour: Flavour, base_dir: Path | None = None, defaults: dict[str, Any] | None = None
) -> DatasetConfig:
    """`defaults`: the training config's global dataset settings (`TrainConfig.dataset_defaults`)."""
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: expected a JSON list of dataset entries, got {type(raw).__name__}")
    entries, notes = [], []
    for index, item in enumerate(raw):
        where = f"{source} entry {index}" + (f" (id {item.get('id')!r})" if isinstance(item, dict) and "id" in item else "")
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected an object, got {type(item).__name__}")
        translated = translate({k.removeprefix("--"): v for k, v in item.items()}, DATASET_KEYS, where)
        item = translated.raw
        if item.get("dataset_type", "image") in ("image", "conditioning"):
            item = {**(defaults or {}), **item}
        entries.append(validate_model(DatasetEntry, item, where, translated.problems))
        notes += translated.notes
    config = DatasetConfig(tuple(entries), source, resolved_folder(Path(base_dir or Path.cwd()), "project root"), tuple(notes))
    _check_references(config, flavour)
    return config


def load_dataset_config(
    path: str | Path, flavour: Flavour, base_dir: Path | None = None, defaults: dict[str, Any] | None = None
) -> DatasetConfig:
    return parse_dataset_config(read_json_with_comments(Path(path)), str(path), flavour, base_dir, defaults)


def _count(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def _more_references_hint(flavour: Flavour, count: int) -> str:
    """The fix for a reference count `flavour` does not take: fewer datasets, or a flavour that takes them."""
    from trainer.model.flavours import FLAVOURS

    if count < flavour.min_references:
        return ""
    others = [f.name for f in FLAVOURS.values() if f.min_references <= count <= f.max_references]
    fix = f"; list at most {flavour.max_references}"
    if others:
        fix += f", or use model_flavour {' or '.join(repr(o) for o in others)} (takes {count})"
    return fix


def _shared_cache_folders(config: DatasetConfig, flavour: Flavour) -> list[str]:
    """Two image datasets writing one cache folder would overwrite each other's same-named samples."""
    owners: dict[Path, list[str]] = {}
    for entry in config.image_entries:
        try:
            folders = {config._text_cache_dir(entry, flavour), config.vae_cache_dir(entry)}
        except ConfigError:
            continue  # a dangling link, reported on its own
        for folder in folders:
            owners.setdefault(folder, []).append(entry.id)
    return [
        f"datasets {', '.join(repr(i) for i in ids)} share the cache folder {folder}; give each its own "
        "cache_dir_vae / cache_dir (e.g. cache/vae/<dataset id>)"
        for folder, ids in owners.items()
        if len(ids) > 1
    ]


def _check_references(config: DatasetConfig, flavour: Flavour) -> None:
    """Cross-entry rules: unique ids, links that exist and have the right type, reference counts."""
    problems: list[str] = []
    ids = [e.id for e in config.entries]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"id {dup!r} is used by {ids.count(dup)} entries; ids must be unique")
    by_id = {e.id: e for e in config.entries}
    for entry in config.entries:
        if entry.dataset_type in ("image", "conditioning") and not entry.instance_data_dir:
            problems.append(f"entry {entry.id!r}: instance_data_dir is required for the {entry.dataset_type} dataset")
        if entry.caption_strategy == "instanceprompt" and entry.dataset_type == "image" and not entry.instance_prompt:
            problems.append(f"entry {entry.id!r}: caption_strategy 'instanceprompt' needs an instance_prompt")
        if entry.dataset_type != "image" or entry.disabled:
            continue
        linked = entry.conditioning_ids
        masks = [i for i in linked if i in by_id and by_id[i].conditioning_type == "mask"]
        refs = [i for i in linked if i not in masks]
        if len(masks) > 1:
            problems.append(f"entry {entry.id!r}: conditioning_data links {len(masks)} mask datasets ({', '.join(masks)}); "
                            "a target has one loss mask, keep one")
        if not refs:
            problems.append(
                f"entry {entry.id!r}: an edit dataset needs conditioning_data (the id of the dataset "
                "holding its reference images)"
            )
        if len(refs) > flavour.max_references or len(refs) < flavour.min_references:
            problems.append(
                f"entry {entry.id!r}: {flavour.name} takes {_count(flavour.min_references, flavour.max_references)} "
                f"conditioning dataset(s), got {len(refs)} in conditioning_data" + _more_references_hint(flavour, len(refs))
            )
        for ref in linked:
            if ref not in by_id:
                problems.append(f"entry {entry.id!r}: conditioning_data {ref!r} does not exist; {suggest(ref, by_id)}")
            elif by_id[ref].dataset_type != "conditioning":
                problems.append(f"entry {entry.id!r}: conditioning_data {ref!r} has dataset_type {by_id[ref].dataset_type!r}, expected 'conditioning'")
        embeds = entry.conditioning_image_embeds
        if embeds is not None:
            if not flavour.uses_conditioning_image_embeds:
                problems.append(f"entry {entry.id!r}: conditioning_image_embeds is an edit-v1 cache; {flavour.name} encodes references on demand. Remove the key.")
            elif embeds not in by_id:
                problems.append(
                    f"entry {entry.id!r}: conditioning_image_embeds {embeds!r} does not exist; add an entry "
                    f"{{\"id\": \"{embeds}\", \"type\": \"local\", \"dataset_type\": \"conditioning_image_embeds\", "
                    f"\"cache_dir\": \"cache/conditioning_image_embeds/{entry.id}\"}} or {suggest(embeds, by_id)}"
                )
            elif by_id[embeds].dataset_type != "conditioning_image_embeds":
                problems.append(f"entry {entry.id!r}: conditioning_image_embeds {embeds!r} has dataset_type {by_id[embeds].dataset_type!r}, expected 'conditioning_image_embeds'")
    problems += _shared_cache_folders(config, flavour)
    if not config.image_entries:
        problems.append("no enabled dataset with dataset_type 'image' (the edit targets)")
    if problems:
        raise ConfigError(problems_message(config.source, problems))
