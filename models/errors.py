"""The one error type of the models package."""
from __future__ import annotations


class ModelError(ValueError):
    """Bad input to, or a bad file for, the MMDL models (unreadable image, malformed checkpoint, ...)."""
