"""Helpers that turn files into metadata the Dagster UI shows: thumbnails, tables, links."""

import base64
import io
from pathlib import Path

import dagster as dg


def thumbnail_markdown(paths: list[Path], size: int = 96) -> str:
    """Inline PNG thumbnails, so the UI shows samples without opening files."""
    from PIL import Image

    cells = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
        encoded = base64.b64encode(buffer.getvalue()).decode()
        cells.append(f"![{path.name}](data:image/png;base64,{encoded})")
    return " ".join(cells)


def image_markdown(path: Path, title: str = "") -> dg.MarkdownMetadataValue:
    encoded = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"{title}\n\n![{Path(path).name}](data:image/png;base64,{encoded})")


def url_or_text(url: str | None) -> dg.MetadataValue:
    return dg.MetadataValue.url(url) if url else dg.MetadataValue.text("(no MLflow run)")
