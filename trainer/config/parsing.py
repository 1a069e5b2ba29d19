"""Reading users' config files: JSON with comments, SimpleTuner's spellings, `--set` overrides,
and errors that name the key, the value and the fix."""

from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import json5
from pydantic import BaseModel, ValidationError

from trainer.config.schema import TrainConfig
from trainer.config.simpletuner_keys import TRAIN_KEYS, translate
from trainer.errors import ConfigError, suggest


def read_json_with_comments(path: Path) -> Any:
    """JSON as users write it: `//` and `/* */` comments and trailing commas are allowed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    try:
        return json5.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


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
    return parse_train_config(raw, source=str(path))


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """`model_kwargs.match_target_res=true` sets a nested key."""
    *parents, leaf = key.split(".")
    for parent in parents:
        raw = raw.setdefault(parent, {})
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
        location = ".".join(str(part) for part in error["loc"]) or "(config)"
        key = str(error["loc"][0]) if error["loc"] else ""
        value = error.get("input")
        if error["type"] == "extra_forbidden":
            nested = _nested_model(model, error["loc"])
            name = str(error["loc"][-1])
            lines.append(f"unknown key {location!r}: {suggest(name, nested.model_fields, list_all=False)}")
        elif error["type"] in ("literal_error", "enum") and (options := _choices_at(model, error["loc"])):
            lines.append(f"{location}={value!r} is not valid: {suggest(str(value), options)}")
        else:
            message = error["msg"].removeprefix("Value error, ")
            shown = f"={value!r}" if key in raw and not isinstance(value, dict) else ""
            lines.append(f"{location}{shown}: {message}")
    return lines


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
    try:
        return key.strip().removeprefix("--"), json5.loads(value)
    except ValueError:
        return key.strip().removeprefix("--"), value
