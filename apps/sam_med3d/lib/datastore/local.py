"""The app's datastore for a local studies folder: MONAI Label's ``LocalDatastore`` that checks every name and
every upload before anything touches the folder, and never loses a label.

MONAI Label 0.8.5's ``LocalDatastore`` joins request fields straight into paths: an image id
``../outside/evil`` or a tag ``../../x`` wrote outside the studies folder, a tag ``..`` overwrote the image
itself, and ``remove_image`` of an id that reached the datastore file removed whatever the path named. It
also accepts any file as an image or label, overwrites a saved label without a copy, and keeps a superseded
``.nii.gz`` beside a newer ``.nrrd`` (deleting the newer one brought the old one back). This subclass:

- validates image ids, label tags and file extensions (:mod:`lib.validation`) on every call that
  builds a path; an unknown image id is a 404 naming it; an existing image id is never overwritten (409);
- validates uploads (``add_image``, ``save_label``) from a temporary file outside the folder: a readable 3D
  scalar volume of at most ``max_voxels`` voxels (from the header), finite; a label on its image's grid with
  integer values 0..255. The accepted file is copied next to its destination under a hidden name and moved
  into place atomically, so a half-written file never appears under a listed name;
- keeps **label history**: saving over an existing label, or deleting one, moves the previous file (whatever
  its extension) to ``<studies>/.history/labels/<tag>/<image id>/<UTC time>_<file name>``; so exactly one
  current file exists per image and tag, and nothing superseded can come back. Deleting an image moves it
  and its labels into ``.history`` too. :meth:`label_history` lists the kept versions (newest first);
- drops entries with unsafe ids or tags that an older server may have written into ``datastore_v2.json``;
- never reads or writes through a link that leaves the studies folder: such files are not listed (nor put into
  the training datalist), an id whose file became such a link is answered 403, and a label, history or image
  folder that resolves outside the folder is not written to (403);
- matches extensions in one place (:func:`~lib.validation.split_extension`): uploads are stored with
  the lower-case extension, and a file saved by hand as ``<id>.NII.GZ`` is still the one current file that a
  new save or a delete moves into the history.

The constructor takes MONAI Label's arguments (auto reload, extensions, read-only) plus ``max_voxels``; only
extensions the app reads (:data:`~lib.validation.IMAGE_EXTENSIONS`) are listed or accepted.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import unicodedata
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Sequence

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from lib.validation import (DEFAULT_MAX_VOXELS, IMAGE_EXTENSIONS, Header, check_image_file, check_label_file,
                            check_name, name_key, read_header, split_extension)
from lib.errors import InvalidRequest
from lib.upstream_fixes.datastore_index import AtomicDatastoreIndex, check_info_size

logger = logging.getLogger(__name__)

#: Hidden folder inside the studies folder that keeps superseded and deleted labels (and deleted images).
HISTORY_DIR = ".history"

#: Marks a file being copied into place; it matches none of the datastore's patterns, so it is never listed.
PARTIAL_SUFFIX = ".partial"


def _patterns(extensions: Optional[Sequence[str]]) -> List[str]:
    """MONAI Label's glob patterns (``*.nii.gz``) restricted to the extensions the app reads."""
    given = [extensions] if isinstance(extensions, str) else list(extensions or [])
    known = [f"*{ext}" for ext in IMAGE_EXTENSIONS]
    kept = [p for p in given if p in known]
    return kept or known



def _grid(header: Header) -> tuple:
    """What a label must match of its image's header (its file name aside)."""
    return header.size, header.spacing, header.origin, header.direction, header.components, header.pixel_type

class SafeLocalDatastore(AtomicDatastoreIndex, LocalDatastore):
    """``LocalDatastore`` with name and upload validation, atomic writes and label history (module docstring);
    its index is written atomically and rebuilt when unreadable (:mod:`lib.upstream_fixes.datastore_index`)."""

    def __init__(self, datastore_path: str, images_dir: str = ".", labels_dir: str = "labels",
                 datastore_config: str = "datastore_v2.json", extensions=("*.nii.gz", "*.nii"),
                 auto_reload: bool = False, read_only: bool = False, max_voxels: int = DEFAULT_MAX_VOXELS):
        self._max_voxels = int(max_voxels)
        self._read_only = bool(read_only)
        patterns = _patterns(extensions)
        self._allowed_extensions = tuple(p[1:] for p in patterns)
        super().__init__(datastore_path, images_dir=images_dir, labels_dir=labels_dir,
                         datastore_config=datastore_config, extensions=patterns, auto_reload=auto_reload,
                         read_only=read_only)

    # ------------------------------------------------------------------------------------------ names
    def _check_id(self, image_id: Any, what: str = "image id") -> str:
        return check_name(image_id, what)

    def _resolve(self, image_id: Any, what: str = "image id") -> str:
        """The checked id in NFC, or the stored id it names (a file named in another Unicode form, e.g. NFD
        from macOS, keeps the id of its file name)."""
        image_id = self._check_id(image_id, what)
        if image_id not in self._datastore.objects:
            image_id = next((key for key in self._datastore.objects
                             if unicodedata.normalize("NFC", key) == image_id), image_id)
        return image_id

    def _check_tag(self, tag: Any) -> str:
        tag = check_name(tag, "label tag", max_length=64)
        return tag

    def _known(self, image_id: Any, what: str = "image id") -> ImageLabelModel:
        """The datastore entry of a valid, existing ``image_id``; 404 naming it otherwise."""
        image_id = self._resolve(image_id, what)
        obj = self._datastore.objects.get(image_id)
        if obj is None:
            raise InvalidRequest(f"{what} {image_id!r} is not in the datastore", status_code=404)
        return obj

    def _extension(self, file_name: str, what: str) -> str:
        return split_extension(os.path.basename(file_name), what, self._allowed_extensions)[1]

    # ------------------------------------------------------------------------------------------ links
    def _is_inside(self, path: str) -> bool:
        """Whether ``path``, links resolved, is inside the studies folder."""
        root = os.path.realpath(self._datastore_path)
        real = os.path.realpath(path)
        return real == root or real.startswith(root.rstrip(os.sep) + os.sep)

    def _inside(self, path: str, what: str) -> str:
        """``path`` if it stays inside the studies folder once links are resolved; 403 naming ``what`` otherwise."""
        if not self._is_inside(path):
            raise InvalidRequest(f"{what} is a link that leads outside the studies folder; the server reads and "
                                 "writes only inside it (replace the link with the file itself)", status_code=403)
        return path

    def _list_files(self, path: str, patterns: Any) -> Dict[str, str]:
        """MONAI Label's listing without files that are links leading outside the studies folder."""
        files = super()._list_files(path, patterns)
        kept = {}
        for key, name in files.items():
            if self._is_inside(os.path.join(path, name)):
                kept[key] = name
            else:
                logger.warning("Datastore: not listing %s: a link that leads outside the studies folder",
                               os.path.join(path, name))
        return kept

    def datalist(self, full_path: bool = True) -> List[Dict[str, Any]]:
        """MONAI Label's (image, final label) records, without any whose file leads outside the studies folder."""
        records = super().datalist(full_path=True)
        kept = [r for r in records if all(self._is_inside(p) for p in r.values())]
        if not full_path:
            kept = [{k: os.path.relpath(v, self._datastore_path) for k, v in r.items()} for r in kept]
        return kept

    # ------------------------------------------------------------------------------------------ paths
    def _history_path(self, *parts: str) -> str:
        return os.path.join(self._datastore_path, HISTORY_DIR, *parts)

    def _archive(self, path: str, *history_parts: str, keep_current: bool = False) -> str:
        """Move ``path`` into ``.history/<history_parts>/<UTC time>_<name>``; return the new path.
        ``keep_current``: link it there instead (a link is linked, never followed), so that ``path`` stays until
        its replacement is in place."""
        folder = self._inside(self._history_path(*history_parts), "the history folder")
        os.makedirs(folder, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        target = os.path.join(folder, f"{stamp}_{os.path.basename(path)}")
        while os.path.exists(target):
            target = os.path.join(folder, f"{stamp}_{uuid.uuid4().hex[:6]}_{os.path.basename(path)}")
        if not keep_current:
            os.replace(path, target)
        elif os.path.islink(path):
            os.symlink(os.readlink(path), target)
        else:
            try:
                os.link(path, target)
            except OSError:  # a file system without hard links
                shutil.copy2(path, target)
        logger.info("Datastore: kept %s as %s", path, target)
        return target

    def _current_files(self, folder: str, stem: str) -> List[str]:
        """Files ``<stem><ext>`` in ``folder`` for every extension the app reads, in any letter case (``.NII.GZ``
        too), links included (a link is moved, never followed); folders are not."""
        if not os.path.isdir(folder):
            return []
        files = []
        for name in sorted(os.listdir(folder)):
            try:
                found, _ = split_extension(name, "file", IMAGE_EXTENSIONS)
            except InvalidRequest:
                continue
            path = os.path.join(folder, name)
            if found == stem and (os.path.islink(path) or not os.path.isdir(path)):
                files.append(path)
        return files

    def _place(self, source: str, dest: str, before_replace: Callable[[], Any] = lambda: None) -> Any:
        """Copy ``source`` next to ``dest`` under a hidden partial name, call ``before_replace``, then move the
        copy into place atomically; return what ``before_replace`` returned."""
        self._inside(os.path.dirname(dest), "the destination folder")
        partial = os.path.join(os.path.dirname(dest), f".{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
        try:
            shutil.copyfile(source, partial)
            done = before_replace()
            os.replace(partial, dest)
            return done
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    # ----------------------------------------------------------------------------------------- images
    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        ext = self._extension(image_filename, "the uploaded image file")
        check_info_size(self._info_object(image_info, "the image's params"), "the image's params")
        if not image_id:
            image_id = split_extension(os.path.basename(image_filename), "the uploaded image file",
                                       self._allowed_extensions)[0]
        image_id = self._check_id(image_id)
        self._refuse_existing_id(image_id)
        check_image_file(image_filename, self._max_voxels, what="the uploaded image")
        name = self._filename(image_id, ext)
        dest = os.path.join(self._datastore.image_path(), name)
        with FileLock(self._lock_file):
            self._refuse_existing_id(image_id)
            self._place(image_filename, dest)
            info = dict(image_info or {})
            info.update(ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        logger.info("Datastore: added image %s (%s)", image_id, name)
        return image_id

    def _refuse_existing_id(self, image_id: str) -> None:
        """409 when ``image_id`` exists, or an image whose id differs from it only by case or Unicode
        normalisation (two such names look alike in a viewer's list, and clash on case-insensitive disks)."""
        if image_id in self._datastore.objects or self._current_files(self._datastore.image_path(), image_id):
            raise InvalidRequest(f"image id {image_id!r} already exists; delete it first or upload under another id",
                                 status_code=409)
        key = name_key(image_id)
        twins = [other for other in self._datastore.objects if name_key(other) == key]
        twins += [name for name in os.listdir(self._datastore.image_path())
                  if not name.startswith(".") and name_key(name).startswith(key + ".")
                  and any(name_key(name) == key + ext for ext in IMAGE_EXTENSIONS)]
        if twins:
            raise InvalidRequest(f"image id {image_id!r} differs from the existing {twins[0]!r} only by letter case or "
                                 "Unicode form; use that id or a clearly different one", status_code=409)

    def remove_image(self, image_id: str) -> None:
        obj = self._known(image_id)
        with FileLock(self._lock_file):
            for tag in list(obj.labels):
                self._archive_labels(image_id, tag)
            for path in self._current_files(self._datastore.image_path(), image_id):
                self._archive(path, "images", image_id)
        logger.info("Datastore: removed image %s (kept in %s)", image_id, self._history_path("images", image_id))
        self.refresh()

    def get_image_uri(self, image_id: str) -> str:
        image_id = self._resolve(image_id)
        uri = super().get_image_uri(image_id)
        if uri:  # MONAI Label resolves links: check where it leads
            self._inside(uri, f"the file of image {image_id!r}")
        return uri

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        return super().get_image_info(self._resolve(image_id))

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        obj = self._known(image_id)
        info = self._info_object(info, "the image info")
        with FileLock(self._lock_file):
            obj.image.info = self._merged_info(obj.image.info, info, f"the info of image {image_id!r}")
            self._update_datastore_file(lock=False)

    # ----------------------------------------------------------------------------------------- labels
    def _archive_labels(self, image_id: str, tag: str) -> List[str]:
        """Move every current label file of ``image_id`` under ``tag`` into the history (lock held)."""
        folder = self._datastore.label_path(tag)
        return [self._archive(path, "labels", tag, image_id) for path in self._current_files(folder, image_id)]

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        obj = self._known(image_id)
        tag = self._check_tag(label_tag)
        labels_root = self._datastore.label_path(None)
        twins = [name for name in (os.listdir(labels_root) if os.path.isdir(labels_root) else [])
                 if name != tag and name_key(name) == name_key(tag)]
        if twins:
            raise InvalidRequest(f"label tag {tag!r} differs from the existing tag {twins[0]!r} only by letter case or "
                                 "Unicode form; use that tag or a clearly different one", status_code=409)
        ext = self._extension(label_filename, "the uploaded label file")
        check_info_size(self._info_object(label_info, "the label's params"), "the label's params")
        image_header = read_header(self.get_image_uri(image_id), f"the stored image {image_id!r}")
        check_label_file(label_filename, image_header, self._max_voxels, what="the uploaded label")
        folder = self._inside(self._datastore.label_path(tag), f"the folder of label tag {tag!r}")
        name = self._filename(image_id, ext)
        with FileLock(self._lock_file):
            # The image may have been deleted (or deleted and uploaded again) since it was checked above: a label
            # placed now would be an orphan, attached to whatever scan takes that id next.
            obj = self._still_there(image_id, image_header)
            os.makedirs(folder, exist_ok=True)
            # The current label stays in place until the new one replaces it (a kill at any moment leaves one
            # current label, old or new); the old one is linked into the history first.
            current = self._current_files(folder, image_id)
            dest = os.path.join(folder, name)
            kept = self._place(label_filename, dest, before_replace=lambda: [
                self._archive(path, "labels", tag, image_id, keep_current=True) for path in current])
            for path in current:
                if path != dest:  # another extension or spelling: archived above, no longer current
                    os.remove(path)
            info = dict(label_info or {})
            info.update(ts=int(time.time()), name=name)
            if kept:
                info["previous"] = os.path.relpath(kept[-1], self._datastore_path)
            obj.labels[tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        logger.info("Datastore: saved label %s/%s (%s)%s", tag, image_id, name,
                    f"; previous version kept in {self._history_path('labels', tag, image_id)}" if kept else "")
        return image_id

    def _still_there(self, image_id: str, image_header: Header) -> ImageLabelModel:
        """The entry of ``image_id`` if its file is still the one whose header was read (lock held); 409 otherwise."""
        obj = self._datastore.objects.get(image_id)
        files = self._current_files(self._datastore.image_path(), image_id)
        stored = read_header(files[0], f"the stored image {image_id!r}") if obj is not None and files else None
        if stored is None or _grid(stored) != _grid(image_header):
            raise InvalidRequest(f"image {image_id!r} was deleted or replaced while its label was being saved; "
                                 "nothing was saved (save it again if the image is back)", status_code=409)
        return obj

    def remove_label(self, label_id: str, label_tag: str) -> None:
        obj = self._known(label_id)
        tag = self._check_tag(label_tag)
        if tag not in obj.labels and not self._current_files(self._datastore.label_path(tag), label_id):
            raise InvalidRequest(f"image {label_id!r} has no label with tag {tag!r}", status_code=404)
        with FileLock(self._lock_file):
            self._archive_labels(label_id, tag)
        logger.info("Datastore: removed label %s/%s (kept in %s)", tag, label_id,
                    self._history_path("labels", tag, label_id))
        self.refresh()

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        label_id = self._resolve(label_id)
        label_tag = self._check_tag(label_tag)
        uri = super().get_label_uri(label_id, label_tag)
        if uri:
            self._inside(uri, f"the label {label_tag!r} of image {label_id!r}")
        return uri

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        return super().get_label_info(self._resolve(label_id), self._check_tag(label_tag))

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        obj = self._known(label_id, "label id")
        tag = self._check_tag(label_tag)
        label = obj.labels.get(tag)
        if label is None:
            raise InvalidRequest(f"image {label_id!r} has no label with tag {tag!r}", status_code=404)
        info = self._info_object(info, "the label info")
        with FileLock(self._lock_file):
            label.info = self._merged_info(label.info, info, f"the info of label {tag}/{label_id}")
            self._update_datastore_file(lock=False)

    @staticmethod
    def _info_object(info: Any, what: str) -> Dict[str, Any]:
        if info is None:
            return {}
        if not isinstance(info, dict):
            raise InvalidRequest(f"{what} must be a JSON object, got {type(info).__name__}")
        return info

    def label_history(self, image_id: str, tag: str = "final") -> List[Dict[str, Any]]:
        """Kept versions of ``image_id``'s label ``tag``, newest first: ``{"path", "name", "archived"}``."""
        image_id = self._check_id(image_id)
        tag = self._check_tag(tag)
        folder = self._history_path("labels", tag, image_id)
        if not os.path.isdir(folder):
            return []
        entries = []
        for name in sorted(os.listdir(folder), reverse=True):
            stamp, _, original = name.partition("_")
            entries.append({"path": os.path.join(folder, name), "name": original, "archived": stamp})
        return entries

    # ---------------------------------------------------------------------------------- reconciliation
    def _remove_non_existing(self) -> int:
        """MONAI Label's reconciliation, then drop entries with unsafe ids or tags (an older server may have
        stored some in ``datastore_v2.json``), so no later call builds a path from them."""
        removed = super()._remove_non_existing()
        for image_id in list(self._datastore.objects):
            obj = self._datastore.objects[image_id]
            try:
                check_name(image_id, "image id")
                split_extension("x" + obj.image.ext, "image", self._allowed_extensions)
                self._inside(os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext)),
                             f"the file of image {image_id!r}")
            except InvalidRequest as err:
                logger.warning("Datastore: ignoring entry %r from the datastore file (%s)", image_id, err.detail)
                del self._datastore.objects[image_id]
                removed += 1
                continue
            for tag in list(obj.labels):
                try:
                    check_name(tag, "label tag", max_length=64)
                    split_extension("x" + obj.labels[tag].ext, "label", self._allowed_extensions)
                    self._inside(os.path.join(self._datastore.label_path(tag), self._filename(image_id,
                                 obj.labels[tag].ext)), f"the label {tag!r} of {image_id!r}")
                except InvalidRequest as err:
                    logger.warning("Datastore: ignoring label %r of %r (%s)", tag, image_id, err.detail)
                    del obj.labels[tag]
                    removed += 1
        return removed
