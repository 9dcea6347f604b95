"""Settings schema, defaults, loading and validation. The only package that reads configuration files."""
from config.loading import ConfigError, load_settings, settings_from_mapping
from config.settings import Peer, Settings

__all__ = ["ConfigError", "Peer", "Settings", "load_settings", "settings_from_mapping"]
