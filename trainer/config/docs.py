"""The README's key tables, generated from the schemas' `Field(description=...)`.

    python -m trainer.config.docs            # rewrite the tables in README.md
    python -m trainer.config.docs --check    # exit 1 if README.md's tables are out of date

Each table sits between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in the README; the text
around them is left alone. A key without a description is an error: document it in the schema.
"""

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

README = Path(__file__).resolve().parents[2] / "README.md"
SHOWN_DEFAULT = "shown_default"  # json_schema_extra key: the default column's text when the value says little
COMMAND = "python -m trainer.config.docs"


def _tables() -> dict[str, type[BaseModel]]:
    from trainer.config.schema import TrainConfig
    from trainer.data.dataset_config import DatasetEntry

    return {"config-keys": TrainConfig, "dataset-keys": DatasetEntry}


def key_rows(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(key, default, meaning) per key; a nested model's keys as `parent.child` rows in its place."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from key_rows(field.annotation, f"{prefix}{name}.")
            continue
        if not field.description:
            raise ValueError(f"{model.__name__}.{name} has no Field(description=...): say what the key does there")
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        default = extra.get(SHOWN_DEFAULT) or _shown(field.default)
        yield f"{prefix}{name}", str(default), field.description


def _shown(value: Any) -> str:
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, float) and value and abs(value) < 1e-3:
        mantissa, exponent = f"{value:e}".split("e")
        return f"`{float(mantissa):g}e{int(exponent)}`"  # 1e-4, as people write it
    return f"`{json.dumps(value)}`"


def key_table(model: type[BaseModel]) -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, meaning in key_rows(model):
        meaning = meaning.replace("|", "\\|")  # a bare | would end the cell
        lines.append(f"| `{key}` | {default} | {meaning} |")
    return "\n".join(lines)


def render_readme(text: str) -> str:
    """`text` with every generated table replaced by the one the schemas give now."""
    for name, model in _tables().items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
            raise ValueError(f"README.md needs one {begin} ... {end} pair around the {model.__name__} table")
        head, rest = text.split(begin)
        _, tail = rest.split(end)
        note = f"<!-- generated from {model.__module__}.{model.__name__} by `{COMMAND}`: edit the descriptions there -->"
        text = f"{head}{begin}\n{note}\n{key_table(model)}\n{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("readme", nargs="?", type=Path, default=README, help=f"default: {README}")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when the tables are out of date")
    args = parser.parse_args(argv)
    current = args.readme.read_text(encoding="utf-8")
    try:
        wanted = render_readme(current)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.check:
        if wanted != current:
            print(f"{args.readme}: the key tables are out of date; run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        from trainer.io import atomic_write_text

        atomic_write_text(args.readme, wanted)
        print(f"{args.readme}: key tables rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
