"""The datastore index (``datastore_v2.json``): written atomically, size-bounded ``info``, rebuilt when unreadable.

What MONAI Label 0.8.5 does: ``LocalDatastore._update_datastore_file`` rewrites the index in place
(``open(path, "w")`` then ``write``), so a kill or a crash during a write leaves it empty or cut short; the
next start reads it with ``_init_from_datastore_file(throw_exception=True)`` and the server never starts again
("Application startup failed"). ``info`` fields sent with ``PUT /datastore/image/info`` (and ``label/info``,
and the ``params`` of uploads) are merged into the index without a limit, so anyone can grow the file (and
widen the window of a torn write) by a megabyte per request.

Why we change it: nothing a user saved may be lost, and the server must start after any crash. The labels
themselves are files in the studies folder; the index only caches their names and ``info``.

What :class:`AtomicDatastoreIndex` (a mixin in front of ``LocalDatastore`` in the MRO) does:

- every write goes to a temporary file in the same folder, is fsynced, ``os.replace``d over the index and the
  folder is fsynced: the index on disk is always the old one or the new one;
- an index that cannot be read (empty, cut short, not JSON, not the model) is moved aside into
  ``<studies>/.history/index/<UTC time>_datastore_v2.json`` and rebuilt from the studies folder by MONAI
  Label's own reconciliation (every image, every label tag folder); label files and label history
  (``.history``) are files and are untouched. ``info`` (scores, who saved) of the lost index is lost;
- temporary files of an interrupted write are removed at start;
- ``info`` is limited to :data:`MAX_INFO_BYTES` of JSON per image or label, after merging (413 naming the
  limit otherwise), so the index stays small, and may not hold NaN or Infinity (Python's ``json`` reads them,
  but the datastore listing could then no longer be answered as JSON: 500).

What would let us delete it: MONAI Label writing its index atomically and starting (with a rebuild) on an
unreadable index, and bounding ``info``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tempfile
from datetime import datetime, timezone
from typing import Any, Dict, Mapping

from filelock import FileLock

from lib.errors import InvalidRequest

logger = logging.getLogger(__name__)

#: Largest ``info`` of one image or label, as JSON (UTF-8 bytes), after merging an update into it.
MAX_INFO_BYTES = 64 * 1024

#: HTTP status of an ``info`` over the limit ("Content Too Large").
STATUS_TOO_LARGE = 413

#: Folder (inside ``.history``) that keeps an index that could not be read.
UNREADABLE_INDEX_DIR = os.path.join(".history", "index")


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` by ``text``: temporary file in the same folder, fsync, ``os.replace``, fsync the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    folder_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(folder_fd)  # the rename itself survives a power loss
    finally:
        os.close(folder_fd)


def check_info_size(info: Mapping[str, Any], what: str) -> None:
    """Refuse an ``info`` whose JSON is larger than :data:`MAX_INFO_BYTES` (413 naming ``what``)."""
    try:
        # allow_nan=False: NaN or Infinity in the index made every later GET /datastore/?output=all a 500
        size = len(json.dumps(info, default=str, allow_nan=False).encode("utf-8"))
    except (TypeError, ValueError, RecursionError) as err:
        raise InvalidRequest(f"{what} cannot be stored as JSON ({err})") from None
    if size > MAX_INFO_BYTES:
        raise InvalidRequest(f"{what} is too large: {size} bytes of JSON, at most {MAX_INFO_BYTES}",
                             status_code=STATUS_TOO_LARGE)


class AtomicDatastoreIndex:
    """Mixin for MONAI Label's ``LocalDatastore`` (and subclasses): see the module docstring."""

    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True  # MONAI Label's file watcher: our own write, not an external edit
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            write_atomically(self._datastore_config_path, text)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        from monailabel.datastore.local import LocalDatastoreModel

        with FileLock(self._lock_file):
            path = self._datastore_config_path
            read_only = getattr(self, "_read_only", False)
            if not getattr(self, "_index_temporaries_removed", False) and not read_only:
                self._index_temporaries_removed = True  # once per process: writers hold the same lock
                for partial in glob.glob(os.path.join(glob.escape(os.path.dirname(path)),
                                                      f".{glob.escape(os.path.basename(path))}.*.tmp")):
                    try:
                        os.unlink(partial)
                        logger.warning("Datastore: removed %s left by an interrupted index write", partial)
                    except FileNotFoundError:
                        pass
            if not os.path.exists(path):
                return
            ts = os.stat(path).st_mtime
            if ts == self._config_ts:
                return
            try:
                with open(path, encoding="utf-8") as fp:
                    model = LocalDatastoreModel.model_validate_json(fp.read())
            except (ValueError, OSError) as err:  # pydantic's ValidationError and UnicodeDecodeError are ValueErrors
                self._set_aside_unreadable_index(str(err).splitlines()[0] if str(err) else type(err).__name__)
                return
            self._datastore = model
            self._datastore.base_path = self._datastore_path
            self._config_ts = ts

    def _set_aside_unreadable_index(self, reason: str) -> None:
        """Keep the unreadable index in ``.history/index`` and start from an empty one (lock held); the
        reconciliation that follows (at start, or the next refresh) lists the studies folder again."""
        from monailabel.datastore.local import LocalDatastoreModel

        if getattr(self, "_read_only", False):
            # A read-only datastore writes nothing (MONAI Label skips its reconciliation too): it starts empty.
            logger.error("Datastore: the index %s could not be read (%s); read-only, so it is neither replaced nor "
                         "rebuilt: no image is listed until it is repaired or the server runs without read-only",
                         self._datastore_config_path, reason)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime
        else:
            folder = os.path.join(self._datastore_path, UNREADABLE_INDEX_DIR)
            os.makedirs(folder, exist_ok=True)
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            kept = os.path.join(folder, f"{stamp}_{os.path.basename(self._datastore_config_path)}")
            os.replace(self._datastore_config_path, kept)
            logger.error("Datastore: the index %s could not be read (%s); kept it as %s and rebuilding it from the "
                         "studies folder (images, labels and label history are files and are kept)",
                         self._datastore_config_path, reason, kept)
            self._config_ts = 0
        old = self._datastore
        self._datastore = LocalDatastoreModel(name=old.name, description=old.description,
                                              images_dir=old.images_dir, labels_dir=old.labels_dir)
        self._datastore.base_path = self._datastore_path

    def _merged_info(self, current: Mapping[str, Any], update: Mapping[str, Any], what: str) -> Dict[str, Any]:
        merged = dict(current or {})
        merged.update(update or {})
        check_info_size(merged, what)
        return merged
