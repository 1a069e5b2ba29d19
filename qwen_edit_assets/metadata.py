"""Helpers that turn files and numbers into metadata the Dagster UI shows readably: thumbnails, tables,
links, floats to 4 significant digits, sizes in MB."""

import base64
import io
import math
from pathlib import Path

import dagster as dg

SIGNIFICANT_DIGITS = 4


def thumbnail_markdown(paths: list[Path], size: int = 96) -> str:
    """Inline PNG thumbnails, so the UI shows samples without opening files."""
    return " ".join(f"![{Path(path).name}]({thumbnail_uri(path, size)})" for path in paths)


def thumbnail_uri(path: Path, size: int = 96) -> str:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def image_markdown(path: Path, title: str = "") -> dg.MarkdownMetadataValue:
    encoded = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"{title}\n\n![{Path(path).name}](data:image/png;base64,{encoded})")


def url_or_text(url: str | None) -> dg.MetadataValue:
    return dg.MetadataValue.url(url) if url else dg.MetadataValue.text("(no MLflow run)")


def rounded(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """1.27663 -> 1.277, 5.123e-05 -> 5.123e-05: what a reader compares, not float noise."""
    if not math.isfinite(value) or value == 0:
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def readable_size(nbytes: int) -> dg.FloatMetadataValue:
    """A size in MB (10^6 bytes), 3 significant digits."""
    return dg.MetadataValue.float(rounded(nbytes / 1e6, 3))


def readable(metadata: dict) -> dict:
    """Floats rounded (plain or FloatMetadataValue); `*_bytes` entries become `*_size_mb`; the rest as they are."""
    out = {}
    for key, value in metadata.items():
        raw = value.value if isinstance(value, dg.FloatMetadataValue | dg.IntMetadataValue) else value
        if key.endswith("_bytes") and isinstance(raw, int | float) and not isinstance(raw, bool):
            out[key.removesuffix("_bytes") + "_size_mb"] = readable_size(int(raw))
        elif isinstance(raw, float) and not isinstance(value, dg.IntMetadataValue):
            out[key] = dg.MetadataValue.float(rounded(raw))
        else:
            out[key] = value
    return out


GRID_STAGES = (("base_image", "base"), ("lora_image", "LoRA"), ("target", "target"))


def validation_grid_markdown(rows, max_rows: int = 12, size: int = 96) -> str:
    """The validation edits as a table the UI renders: a header per column (pair, instruction, each reference,
    base, LoRA, target) and one row per pair with its instruction beside its images."""
    shown = list(rows)[:max_rows]
    n_refs = max((len(row.references) for row in shown), default=1)
    headers = ["pair", "instruction", *(f"reference {i + 1}" for i in range(n_refs)), *(title for _, title in GRID_STAGES)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in shown:
        images = [*row.references, *[""] * (n_refs - len(row.references)), *(getattr(row, attr) for attr, _ in GRID_STAGES)]
        cells = [_cell_text(row.name), _cell_text(row.caption)]
        cells += [f"![{title}]({thumbnail_uri(path, size)})" if path else "" for path, title in zip(images, headers[2:])]
        lines.append("| " + " | ".join(cells) + " |")
    if len(rows) > max_rows:
        lines.append(f"\n({len(rows) - max_rows} more pair(s) in the HTML report)")
    return "\n".join(lines)


def _cell_text(text: str) -> str:
    """Text inside a markdown table cell: no line breaks, no cell separators, no markup."""
    for char in "\\`*_[]<>#|":
        text = text.replace(char, "\\" + char)
    return " ".join(text.split())


TABLE_METRICS = ("latent_mse", "psnr", "ssim", "edit_success", "preservation")  # the per-pair numbers worth a glance


def validation_table(rows) -> dg.TableMetadataValue:
    """The validation pairs as a table the UI shows inline (text only: markdown with images is one click
    away): pair, instruction, references, and base vs LoRA for the main metrics."""
    metrics = [m for m in TABLE_METRICS if any(f"base_{m}" in row.metrics or f"lora_{m}" in row.metrics for row in rows)]
    columns = [
        dg.TableColumn("pair", "string", "the file name shared by target and references"),
        dg.TableColumn("instruction", "string", "the edit instruction (caption) it was generated with"),
        dg.TableColumn("references", "int", "reference images fed to the model"),
    ]
    for metric in metrics:
        for stage, title in (("base", "base"), ("lora", "LoRA")):
            columns.append(dg.TableColumn(f"{title} {metric}", "float", f"{metric} of the {title} edit against the target"))
    records = []
    for row in rows:
        record = {"pair": row.name, "instruction": row.caption, "references": len(row.references)}
        for metric in metrics:
            for stage, title in (("base", "base"), ("lora", "LoRA")):
                value = row.metrics.get(f"{stage}_{metric}")
                record[f"{title} {metric}"] = None if value is None else rounded(value)
        records.append(dg.TableRecord(record))
    return dg.MetadataValue.table(records, schema=dg.TableSchema(columns=columns))
