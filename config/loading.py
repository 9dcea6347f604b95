"""Reading the TOML file and turning every validation problem into a message with its key path."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from config.settings import Settings, TlsSettings

SectionT = TypeVar("SectionT", bound=BaseModel)


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
    resolved = {
        "node": _resolved(settings.node, ("data_dir",), base_dir),
        "model": _resolved(settings.model, ("path",), base_dir),
        "tls": _resolved(settings.tls, _TLS_FILES, base_dir),
        "hl7": settings.hl7.model_copy(update={"tls": _resolved(settings.hl7.tls, _TLS_FILES, base_dir)}),
    }
    settings = settings.model_copy(update=resolved)
    missing = _missing_files("tls", settings.tls) + _missing_files("hl7.tls", settings.hl7.tls)
    if missing:
        raise ConfigError(source, missing)
    return settings


_TLS_FILES = ("certificate", "private_key", "ca_certificates")


def _resolved(section: SectionT, keys: tuple[str, ...], base_dir: Path) -> SectionT:
    """``section`` with its relative paths under ``keys`` taken from ``base_dir``."""
    update = {key: (base_dir / value).resolve() for key in keys
              if (value := getattr(section, key)) is not None and not value.is_absolute()}
    return section.model_copy(update=update) if update else section


def _missing_files(prefix: str, tls: TlsSettings) -> list[str]:
    """The files an enabled TLS section names that do not exist (checked after paths are resolved)."""
    if not tls.enabled:
        return []
    return [f"{prefix}.{key}: file not found, got '{path}'" for key in _TLS_FILES
            if (path := getattr(tls, key)) is not None and not path.is_file()]


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
