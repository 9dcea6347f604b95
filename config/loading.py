"""Reading the TOML file and turning every validation problem into a message with its key path."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from config.settings import Settings


class ConfigError(ValueError):
    """The configuration cannot be used; ``problems`` lists each one as 'key.path: message'."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid configuration\n" + "\n".join(f"  {p}" for p in problems))


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def _problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] != "missing" and not isinstance(item.get("input"), dict):
            message = f"{message}, got {item.get('input')!r}"
        problems.append(f"{_key_path(item['loc'])}: {message}")
    return problems


def settings_from_mapping(data: dict[str, Any], source: str = "<settings>", base_dir: Path | None = None) -> Settings:
    """Validate a mapping; relative paths are taken relative to ``base_dir`` (the file's folder)."""
    try:
        settings = Settings.model_validate(data)
    except ValidationError as error:
        raise ConfigError(source, _problems(error)) from None
    if base_dir is None:
        return settings
    for location, keys in _PATH_KEYS.items():
        settings = _resolve_paths(settings, location, keys, base_dir)
    _check_files(settings, source)
    return settings


_TLS_FILES = ("certificate", "private_key", "ca_certificates")
# Where the settings name files: (section path, keys); relative ones are taken from the file's folder.
_PATH_KEYS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("node",): ("data_dir",), ("model",): ("path",), ("tls",): _TLS_FILES, ("hl7", "tls"): _TLS_FILES,
    ("web", "tls"): _TLS_FILES,
}


def _resolve_paths(model: BaseModel, location: tuple[str, ...], keys: tuple[str, ...], base_dir: Path) -> Any:
    """``model`` with the relative paths at ``location`` made absolute under ``base_dir``."""
    if location:
        inner = getattr(model, location[0])
        return model.model_copy(update={location[0]: _resolve_paths(inner, location[1:], keys, base_dir)})
    update = {key: (base_dir / value).resolve() for key in keys
              if (value := getattr(model, key)) is not None and not value.is_absolute()}
    return model.model_copy(update=update) if update else model


def _check_files(settings: Settings, source: str) -> None:
    """Files the settings name must exist (checked after paths are resolved)."""
    missing = [f"{prefix}.{key}: file not found, got '{path}'"
               for prefix, tls in (("tls", settings.tls), ("hl7.tls", settings.hl7.tls), ("web.tls", settings.web.tls))
               if tls.enabled
               for key in _TLS_FILES if (path := getattr(tls, key)) is not None and not path.is_file()]
    if missing:
        raise ConfigError(source, missing)


def load_settings(path: str | Path | None) -> Settings:
    """Load and validate the TOML file at ``path``; None gives the embedded defaults."""
    if path is None:
        return settings_from_mapping({}, base_dir=Path.cwd())
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found"]) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(str(path), [f"not valid TOML: {error}"]) from None
    return settings_from_mapping(data, source=str(path), base_dir=path.resolve().parent)
