"""The file store: received datasets kept exactly as encoded, written durably, at paths built from checked UIDs."""
from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path

from dicom_node.errors import NodeError
from indexer.durable import fsync_directory, fsync_path

# Digits and dots, no empty component, at most 64 characters: nothing that can climb out of a folder.
# (Leading zeros, which PS3.5 forbids, are still accepted: real archives have them and they are path-safe.)
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_STORED = re.compile(rf"{_UID.pattern}/{_UID.pattern}/{_UID.pattern}\.dcm")  # relative_path's shape
INCOMING = ".incoming"
_DURABLE_FOLDERS = 4096  # folders remembered as durable (an LRU; one forgotten is fsynced into its parent again)


def check_uid(value: object, name: str) -> str:
    """Return ``value`` as a UID string, or raise NodeError naming the attribute."""
    text = str(value or "").strip().rstrip("\x00")
    if not text:
        raise NodeError(f"{name} is missing")
    if len(text) > 64 or not _UID.fullmatch(text):
        raise NodeError(f"{name} is not a valid UID ({len(text)} characters, must be digits and dots, <= 64)")
    return text



class FileStore:
    """``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, UIDs checked first.

    Datasets arrive in ``<root>/.incoming`` (on the same file system, so keeping one is a rename) and
    leave it either renamed into place or deleted; what a crash or an aborted transfer leaves there is
    removed at start and, while running, once it is older than any transfer can last.
    """

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.incoming = root / INCOMING
        self.min_free_bytes = min_free_bytes
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._real_root = root.resolve()  # once: resolving follows every component of the path
        # Study and series folders whose entry in their parent this process has fsynced, most recent last. Any
        # other folder, found or created, may have been created by a thread or a receiver process that has not
        # fsynced its parent yet: it is fsynced into its parent once before anything stored in it is answered.
        self._durable: OrderedDict[Path, None] = OrderedDict()
        self._folders = threading.Lock()

    def has_room(self, incoming: int = 0) -> bool:
        """Whether ``incoming`` bytes still leave the configured free space (the disk watermark)."""
        return shutil.disk_usage(self.root).free - incoming >= self.min_free_bytes

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        parts = (check_uid(study_uid, "StudyInstanceUID"), check_uid(series_uid, "SeriesInstanceUID"),
                 check_uid(sop_uid, "SOPInstanceUID"))
        return f"{parts[0]}/{parts[1]}/{parts[2]}.dcm"

    def absolute(self, relative: str) -> Path:
        """Where ``relative`` lies: a path of the store's own shape (``relative_path``'s: UIDs, which cannot
        climb out) joined to the resolved root as it is; any other resolved and refused if it leaves the root."""
        if _STORED.fullmatch(relative):
            return self._real_root / relative
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self._real_root):
            raise NodeError(f"path {relative!r} leaves the storage folder")
        return path

    def keep(self, relative: str, received: Path) -> None:
        """Make ``received`` (a file in ``incoming``) the stored instance: fsync it, rename it into place,
        fsync the series folder, then the study folder and the storage root unless the series and study folders'
        own entries are known durable. After this returns the instance survives a crash."""
        final = self.absolute(relative)
        unsynced = self._make_folders(final.parent)
        fsync_path(received)
        os.replace(received, final)
        fsync_directory(final.parent)
        for folder in unsynced:  # the series folder first, then the study folder
            fsync_directory(folder.parent)
            with self._folders:
                self._durable[folder] = None
                if len(self._durable) > _DURABLE_FOLDERS:
                    self._durable.popitem(last=False)

    def _make_folders(self, series_folder: Path) -> list[Path]:
        """Create the study and series folders where missing; return those whose entry in their parent is not
        known durable, series first."""
        unsynced = []
        with self._folders:
            for folder in (series_folder, series_folder.parent):
                if folder in self._durable:
                    self._durable.move_to_end(folder)
                else:
                    unsynced.append(folder)
        for folder in reversed(unsynced):  # known durable means existing: only the others may be missing
            folder.mkdir(exist_ok=True)
        return unsynced

    def remove(self, relative: str) -> None:
        """Delete a stored instance (its catalog row was not committed) and make the deletion durable."""
        path = self.absolute(relative)
        path.unlink(missing_ok=True)
        fsync_directory(path.parent)

    def remove_temporaries(self, older_than_s: float = 0.0) -> int:
        """Delete received datasets (``*.dcm``) left in ``incoming`` untouched for ``older_than_s`` seconds;
        returns how many. Other temporary files of the node's process there are left to their owners."""
        now = time.time()
        count = 0
        for leftover in self.incoming.glob("*.dcm"):
            try:
                if now - leftover.stat().st_mtime >= older_than_s:
                    leftover.unlink()
                    count += 1
            except FileNotFoundError:  # renamed into place or deleted meanwhile
                continue
        return count
