"""Reading users' config files: JSON with comments, SimpleTuner's spellings, `--set` overrides,
and errors that name the key, the value and the fix."""

from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import json5
from pydantic import BaseModel, ValidationError

from trainer.config.schema import TrainConfig
from trainer.config.simpletuner_keys import TRAIN_KEYS, translate
from trainer.errors import ConfigError, suggest


MAX_NESTING = 32  # configs nest 3 levels deep; far deeper is a broken or hostile file


def read_json_with_comments(path: Path) -> Any:
    """JSON as users write it: `//` and `/* */` comments and trailing commas are allowed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give the JSON file inside it") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the file as UTF-8") from None
    except (OSError, ValueError) as exc:  # permissions, symlink loops, a NUL byte in the name
        raise ConfigError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    return parse_json_text(text, str(path))


def parse_json_text(text: str, source: str) -> Any:
    """json5 (recursive, pure Python) with its failures as one ConfigError naming `source`."""
    if _max_depth(text) > MAX_NESTING:
        raise ConfigError(f"{source}: nested more than {MAX_NESTING} levels deep; a config is a flat object or list of objects")
    try:
        return json5.loads(text)
    except (ValueError, RecursionError, OverflowError) as exc:
        raise ConfigError(f"{source}: not valid JSON ({exc})") from None


def _max_depth(text: str) -> int:
    """Bracket depth outside strings and comments, found without parsing (json5 recurses per level)."""
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char in "\"'":  # skip the string, honouring backslash escapes
            i += 1
            while i < n and text[i] != char:
                i += 2 if text[i] == "\\" else 1
        elif text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            i = text.find("*/", i + 2)
            i = n if i < 0 else i + 1
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
        i += 1
    return deepest


def _strip_cli_prefix(raw: dict[str, Any]) -> dict[str, Any]:
    return {key.removeprefix("--"): value for key, value in raw.items()}


def parse_train_config(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate a dict into a TrainConfig; errors name the key, the value and the fix."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object of config keys, got {type(raw).__name__}")
    translated = translate(_strip_cli_prefix(raw), TRAIN_KEYS, source, aliases=True)
    config = validate_model(TrainConfig, translated.raw, source, translated.problems)
    config._notes = tuple(translated.notes)
    return config


def validate_model(
    model: type[BaseModel],
    raw: dict[str, Any],
    source: str,
    problems: list[str],
) -> BaseModel:
    """`raw` as `model`; one ConfigError lists its validation errors and the `problems` found before."""
    try:
        validated = model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(problems_message(source, validation_problems(exc, raw, model) + problems)) from None
    if problems:
        raise ConfigError(problems_message(source, problems))
    return validated


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    raw = read_json_with_comments(Path(path))
    if isinstance(raw, dict) and overrides:
        raw = _strip_cli_prefix(raw)
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
    config = parse_train_config(raw, source=str(path))
    if config.sweep:  # each point as `--set` would give it: a bad value fails here, not in its training run
        from trainer.config.sweep import check_points

        check_points(raw, config.sweep, str(path))
    return config


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """`model_kwargs.match_target_res=true` sets a nested key."""
    *parents, leaf = key.split(".")
    if not all(parents) or not leaf:
        raise ConfigError(f"override {key!r}: a key or a dotted path such as model_kwargs.match_target_res, without empty parts")
    for depth, parent in enumerate(parents):
        raw = raw.setdefault(parent, {})
        if not isinstance(raw, dict):
            where = ".".join(parents[: depth + 1])
            raise ConfigError(
                f"override {key!r}: {where!r} is {raw!r}, not an object of keys; set {where}=VALUE instead"
            )
    raw[leaf] = value


def problems_message(source: str, problems: list[str]) -> str:
    return f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)


def validation_problems(
    exc: ValidationError,
    raw: dict[str, Any],
    model: type[BaseModel],
) -> list[str]:
    """One line per pydantic error, naming the key, the value and the fix."""
    lines = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        key = str(error["loc"][0]) if error["loc"] else ""
        value = error.get("input")
        if not location:  # a rule over several keys: its message names them
            lines.append(error["msg"].removeprefix("Value error, "))
        elif error["type"] == "extra_forbidden":
            nested = _nested_model(model, error["loc"])
            name = str(error["loc"][-1])
            lines.append(f"unknown key {location!r}: {suggest(name, nested.model_fields, list_all=False)}")
        elif error["type"] in ("literal_error", "enum") and (options := _choices_at(model, error["loc"])):
            lines.append(f"{location}={_short_repr(value)} is not valid: {suggest(str(value)[:200], options)}")
        else:
            message = error["msg"].removeprefix("Value error, ")
            shown = f"={_short_repr(value)}" if key in raw and not isinstance(value, dict) else ""
            lines.append(f"{location}{shown}: {message}")
    return lines


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def literal_choices(model: type[BaseModel]) -> dict[str, tuple[Any, ...]]:
    """The allowed values of each key whose type holds a `Literal` (`Literal | None`, lists of one),
    read from the type itself: errors suggest from the very list that validation enforces."""
    return {name: values for name, field in model.model_fields.items() if (values := _literal_values(field.annotation))}


def _literal_values(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return tuple(value for arg in get_args(annotation) for value in _literal_values(arg))


def _choices_at(model: type[BaseModel], loc: tuple) -> tuple[Any, ...]:
    """The Literal values of the key an error location points at, nested models included."""
    choices: tuple[Any, ...] = ()
    for part in loc:  # e.g. ("model_kwargs", "x") or ("b", "list[literal['p','q']]", 0)
        if isinstance(part, str) and part in model.model_fields:
            choices = literal_choices(model).get(part, ())
            annotation = model.model_fields[part].annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                model = annotation
    return choices


def _nested_model(model: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The model that owns the last part of an error location (e.g. ModelKwargs for model_kwargs.x)."""
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation if str(part) in model.model_fields else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return model


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is parsed as JSON when it can be."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. learning_rate=1e-4")
    key, value = text.split("=", 1)
    key = key.strip().removeprefix("--")
    if not key:
        raise ConfigError(f"override {text!r}: the key before '=' is missing, e.g. learning_rate=1e-4")
    if _max_depth(value) > MAX_NESTING:
        raise ConfigError(f"override {key!r}: the value is nested more than {MAX_NESTING} levels deep")
    try:
        return key, json5.loads(value)
    except (ValueError, RecursionError, OverflowError):
        return key, value
