"""Images inside HTML and markdown as `data:` URIs, so a report reads the same wherever it is opened
(MLflow's artifact view, Dagster's metadata, a browser on the file): no relative path to break."""

import base64
import io
import mimetypes
from pathlib import Path

EMBED_MAX_SIDE = 384  # twice the 160-192 px the reports show: sharp on HiDPI screens, a few tens of KB each


def image_data_uri(path: str | Path, max_side: int = EMBED_MAX_SIDE) -> str:
    """The file itself when it is a PNG no larger than `max_side` (lossless: small edits stay visible), else
    a JPEG of it shrunk to `max_side`. A file that does not decode is embedded as it is."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "PNG" and max(image.size) <= max_side:
                return _uri("image/png", data)
            image = image.convert("RGB")
            image.thumbnail((max_side, max_side))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            return _uri("image/jpeg", buffer.getvalue())
    except (UnidentifiedImageError, OSError, ValueError):
        return _uri(mimetypes.guess_type(path.name)[0] or "application/octet-stream", data)


def _uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
