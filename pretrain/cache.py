"""The prepared training cache: every image decoded, resampled and stored once, with the masks that refer to it.

Preparation (``pretrain/prepare.py``) fills it; training (``pretrain/train.py``) only reads it.

**Entries.** Cases whose image is the same file (same inode: symbolic or hard links) or a copy of it (same dataset folder name,
file name and size: the official SA-Med3D layout repeats each image in every class folder it has a mask in)
form one *entry*. Preparing an entry hashes its image files (copies that turn out to differ get their own
image slot), decodes each distinct image once (RAS, ``spacing_mm`` isotropic, bilinear), resamples every mask
onto that grid (nearest), and stores:

- the image cropped to the union of its masks plus ``margin`` voxels (the farthest a training crop reaches),
  in cubic blocks of :data:`BLOCK` voxels, each zlib-compressed (level 1), so a training crop reads and
  decompresses only the blocks it touches. Integer-valued images (CT in HU, most MRI) are stored as int16,
  rounded after resampling (at most 0.5 of the source unit away; positive voxels stay positive, so the
  foreground of the z-score is unchanged); other images as float16 when they fit (relative error at most
  2^-11, far below what the per-crop z-score resolves), else float32.
- each mask cropped to its own bounding box (uint8, or int16 for label maps with larger values), compressed,
  with its per-value voxel counts at ``spacing_mm``.

**Files.** ``<cache>/<variant>/entries/<kk>/<key>.smc`` (256 sub-folders by key prefix), each written to a
temporary name and renamed, so a file is either complete or absent. ``<variant>`` names the cache version,
spacing and margin: a changed setting never reads stale files. The key hashes the files' names (relative to
their data folder), sizes and modification times, so an edited file makes a new entry.
``<cache>/<variant>/progress/shard-<i>-of-<n>.jsonl``: one line per finished entry (its masks, counts and
sizes), appended by the process that prepared it. Training reads only these lines to build its targets;
a preparation run skips every entry already listed in any progress file, whatever ``n`` it was run with.

Entry file: ``MAGIC`` (8 bytes), header length (8 bytes, little-endian), JSON header (shapes, dtypes, block
table of ``[offset, length, compressed]``), then the compressed payload.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

CACHE_VERSION = 2
MAGIC = b"SMCACHE2"
#: Edge of the stored image blocks (voxels): a 128^3 crop touches at most 5^3 blocks of 64 KiB (int16).
BLOCK = 32
ZLIB_LEVEL = 1
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_FLOAT16_TINY = np.float16(2.0 ** -24)  # smallest positive float16 (subnormal)


def variant_name(spacing_mm: float, margin: int) -> str:
    return f"v{CACHE_VERSION}_sp{float(spacing_mm):g}_m{int(margin)}"


# ------------------------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class Entry:
    """One image (or group of identical copies) and the cases whose labels refer to it."""

    key: str
    images: Tuple[str, ...]  # image files, in case order, one per case (duplicates allowed)
    cases: Tuple[int, ...]   # indices into the case list


def file_ident(path: str, root: str) -> str:
    """``<root folder name>/<path relative to root>``: the same on every machine that mounts the data elsewhere."""
    try:
        rel = os.path.relpath(path, root)
    except ValueError:  # another drive (Windows)
        rel = path
    return f"{Path(root).name}/{rel}".replace(os.sep, "/")


def _stamp(path: str) -> Tuple[int, int]:
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def plan_entries(cases: Sequence[Any]) -> List[Entry]:
    """Group ``cases`` (``pretrain.data.Case``) by image: the same file (same device and inode: links of any kind),
    or the same dataset folder name, file name and size (a copy in another class folder). Deterministic: every
    process that plans the same data gets the same entries and keys, with no communication. One ``stat`` per
    file: no image is opened."""
    group_of_file: Dict[Tuple[int, int], Tuple] = {}
    members: "OrderedDict[Tuple, List[int]]" = OrderedDict()
    image_stamps: List[Tuple[int, int]] = []
    for case in cases:
        st = os.stat(case.image)
        image_stamps.append((int(st.st_size), int(st.st_mtime_ns)))
        group = group_of_file.setdefault((st.st_dev, st.st_ino),
                                         (Path(case.dataset).name, Path(case.image).name, int(st.st_size)))
        members.setdefault(group, []).append(len(image_stamps) - 1)
    entries = []
    for indices in members.values():
        described = []
        for i in indices:
            case = cases[i]
            described.append([file_ident(case.image, case.root), *image_stamps[i],
                              file_ident(case.label, case.root), *_stamp(case.label),
                              sorted((case.classes or {}).items())])
        key = hashlib.sha1(json.dumps(described).encode()).hexdigest()
        entries.append(Entry(key=key, images=tuple(cases[i].image for i in indices), cases=tuple(indices)))
    return entries


def shard_of(entries: Sequence[Entry], shard: int, num_shards: int) -> List[Entry]:
    """Entries ``shard, shard + num_shards, ...``: round robin keeps shards balanced however the data are sorted."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in 0..{num_shards - 1} (--shard I/N with 0 <= I < N)")
    return list(entries[shard::num_shards])


# ------------------------------------------------------------------------------------------------ layout
class CacheLayout:
    """Paths of one cache variant."""

    def __init__(self, cache_dir: os.PathLike, spacing_mm: float, margin: int) -> None:
        self.variant = variant_name(spacing_mm, margin)
        self.dir = Path(cache_dir) / self.variant
        self.spacing_mm = float(spacing_mm)
        self.margin = int(margin)

    def entry_path(self, key: str) -> Path:
        return self.dir / "entries" / key[:2] / f"{key}.smc"

    def progress_path(self, shard: int, num_shards: int) -> Path:
        return self.dir / "progress" / f"shard-{shard}-of-{num_shards}.jsonl"

    def read_progress(self) -> Dict[str, Dict[str, Any]]:
        """Every finished entry's record, from all progress files (key -> record). A torn last line (a process
        killed mid-write) is ignored: its entry is found again from its file."""
        records: Dict[str, Dict[str, Any]] = {}
        folder = self.dir / "progress"
        if not folder.is_dir():
            return records
        for path in sorted(folder.glob("shard-*.jsonl")):
            with path.open() as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(record, dict) and "key" in record:
                        records[record["key"]] = record
        return records

    def append_progress(self, shard: int, num_shards: int, record: Mapping[str, Any]) -> None:
        path = self.progress_path(shard, num_shards)
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if path.is_file() and path.stat().st_size:
            with path.open("rb") as f:  # a process killed mid-line: start on a fresh line
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        with path.open("a") as f:
            f.write(("\n" if torn else "") + json.dumps(record, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------ storage
def storage_dtype(image: np.ndarray, integer_source: bool) -> np.dtype:
    """int16 for integer-valued sources within its range, float16 when the values fit, else float32."""
    if image.size == 0:
        return np.dtype(np.int16 if integer_source else np.float16)
    lo, hi = float(image.min()), float(image.max())
    if integer_source and -32768 <= lo and hi <= 32767:
        return np.dtype(np.int16)
    if np.isfinite(lo) and np.isfinite(hi) and max(abs(lo), abs(hi)) <= _FLOAT16_MAX:
        return np.dtype(np.float16)
    return np.dtype(np.float32)


def to_storage(image: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``image`` (float) in ``dtype``, keeping every positive voxel positive (the z-score's foreground is > 0)."""
    positive = image > 0
    if dtype == np.int16:
        out = np.rint(image)
        out[positive & (out < 1)] = 1
        return out.astype(np.int16)
    out = image.astype(dtype)
    if dtype == np.float16:
        out[positive & (out <= 0)] = _FLOAT16_TINY
    return out


def _compress(raw: bytes) -> Tuple[bytes, int]:
    packed = zlib.compress(raw, ZLIB_LEVEL)
    return (packed, 1) if len(packed) < len(raw) else (raw, 0)


def _block_ranges(shape: Sequence[int]) -> List[Tuple[int, int, int]]:
    return [(i, j, k) for i in range(0, shape[0], BLOCK) for j in range(0, shape[1], BLOCK)
            for k in range(0, shape[2], BLOCK)]


def write_entry(path: Path, header: Dict[str, Any], images: Sequence[np.ndarray],
                labels: Sequence[np.ndarray]) -> int:
    """Write an entry file atomically; fills the block tables and offsets of ``header``. Returns its size."""
    payload: List[bytes] = []
    offset = 0
    for meta, image in zip(header["images"], images):
        table = []
        for i, j, k in _block_ranges(image.shape):
            data, compressed = _compress(np.ascontiguousarray(image[i:i + BLOCK, j:j + BLOCK, k:k + BLOCK]).tobytes())
            table.append([offset, len(data), compressed])
            payload.append(data)
            offset += len(data)
        meta["blocks"] = table
    for meta, label in zip(header["labels"], labels):
        data, compressed = _compress(np.ascontiguousarray(label).tobytes())
        meta["data"] = [offset, len(data), compressed]
        payload.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + len(head).to_bytes(8, "little") + head)
            for chunk in payload:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(MAGIC) + 8 + len(head) + offset


def read_header(f) -> Tuple[Dict[str, Any], int]:
    """(header, payload start) of an open entry file."""
    f.seek(0)
    start = f.read(16)
    if len(start) != 16 or start[:8] != MAGIC:
        raise ValueError(f"{getattr(f, 'name', 'cache entry')} is not a cache entry file (bad magic)")
    size = int.from_bytes(start[8:], "little")
    return json.loads(f.read(size)), 16 + size


def record_of(header: Mapping[str, Any], nbytes: int) -> Dict[str, Any]:
    """The progress line of an entry: what training needs to build targets, without the block tables."""
    return {"key": header["key"], "bytes": int(nbytes),
            "images": [{k: m[k] for k in ("shape", "dtype", "files")} for m in header["images"]],
            "labels": [{k: m[k] for k in ("position", "case", "image", "lo", "shape", "counts")}
                       for m in header["labels"]]}


class EntryReader:
    """Reads crops from entry files. Open files and parsed headers are kept per process (an LRU of
    ``max_open``); nothing open is pickled, so it works in DataLoader workers of any start method.
    ``bytes_read`` counts the compressed bytes read (headers excluded)."""

    def __init__(self, layout: CacheLayout, max_open: int = 16) -> None:
        self.layout = layout
        self.max_open = max(1, int(max_open))
        self._open: "OrderedDict[str, Tuple[Any, Dict[str, Any], int]]" = OrderedDict()
        self._pid = os.getpid()
        self.bytes_read = 0

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state

    def close(self) -> None:
        for f, _, _ in self._open.values():
            f.close()
        self._open.clear()

    def _entry(self, key: str) -> Tuple[Any, Dict[str, Any], int]:
        if self._pid != os.getpid():  # a forked worker: files opened by the parent share its read offsets
            self._open, self._pid = OrderedDict(), os.getpid()
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        path = self.layout.entry_path(key)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise FileNotFoundError(f"cache entry {path} is missing although the progress files list it; "
                                    "prepare the cache again (pretrain/prepare.py)") from None
        header, start = read_header(f)
        self._open[key] = (f, header, start)
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1][0].close()
        return self._open[key]

    def _read(self, f, start: int, where: Sequence[int], dtype: np.dtype, shape: Sequence[int]) -> np.ndarray:
        offset, length, compressed = where
        f.seek(start + int(offset))
        data = f.read(int(length))
        self.bytes_read += len(data)
        if compressed:
            data = zlib.decompress(data)
        return np.frombuffer(data, dtype=dtype).reshape(shape)

    def label(self, key: str, index: int) -> np.ndarray:
        """Mask ``index`` of entry ``key``, cropped to its bounding box (see the header's ``lo``/``shape``)."""
        f, header, start = self._entry(key)
        meta = header["labels"][index]
        return self._read(f, start, meta["data"], np.dtype(meta["dtype"]), meta["shape"])

    def image_window(self, key: str, slot: int, start_voxel: Sequence[int], size: int) -> np.ndarray:
        """The cube ``[start, start + size)`` of image ``slot`` (entry frame coordinates) as float32, zeros where it
        leaves the stored region (which is everything a crop can reach inside the scan)."""
        f, header, start = self._entry(key)
        meta = header["images"][slot]
        shape, dtype = meta["shape"], np.dtype(meta["dtype"])
        out = np.zeros((size,) * 3, dtype=np.float32)
        lo = [max(int(s), 0) for s in start_voxel]
        hi = [min(int(s) + size, n) for s, n in zip(start_voxel, shape)]
        if any(h <= l for l, h in zip(lo, hi)):
            return out
        blocks_per_axis = [-(-n // BLOCK) for n in shape]
        first = [l // BLOCK for l in lo]
        last = [(h - 1) // BLOCK for h in hi]
        for bi in range(first[0], last[0] + 1):
            for bj in range(first[1], last[1] + 1):
                for bk in range(first[2], last[2] + 1):
                    index = (bi * blocks_per_axis[1] + bj) * blocks_per_axis[2] + bk
                    b0 = (bi * BLOCK, bj * BLOCK, bk * BLOCK)
                    bshape = [min(BLOCK, n - o) for n, o in zip(shape, b0)]
                    block = self._read(f, start, meta["blocks"][index], dtype, bshape)
                    src, dst = [], []
                    for axis in range(3):
                        a, b = max(lo[axis], b0[axis]), min(hi[axis], b0[axis] + bshape[axis])
                        src.append(slice(a - b0[axis], b - b0[axis]))
                        dst.append(slice(a - int(start_voxel[axis]), b - int(start_voxel[axis])))
                    out[tuple(dst)] = block[tuple(src)]
        return out


# ------------------------------------------------------------------------------------------------ preparation
def sha1_of_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _load_channel_first(path: str):
    from monai.transforms import EnsureChannelFirst, LoadImage

    return EnsureChannelFirst()(LoadImage(image_only=True)(path))


def _is_integer_valued(x) -> bool:
    arr = np.asarray(x)
    return bool(np.all(np.isfinite(arr)) and np.array_equal(arr, np.rint(arr)))


def decode_image(path: str, spacing_mm: float):
    """(MetaTensor (1, I, J, K) float32 in RAS at ``spacing_mm``, whether the decoded values are integers)."""
    from sam_med3d.training import preprocess_transforms

    image = _load_channel_first(path)
    integer = _is_integer_valued(image)
    for t in preprocess_transforms(spacing_mm, load=False, keys=("image",)):
        image = t({"image": image})["image"]
    return image, integer


def decode_label(path: str, spacing_mm: float, image) -> np.ndarray:
    """Label ``path`` on the grid of ``image`` (nearest), as an integer array (I, J, K)."""
    from monai.transforms import ResampleToMatch
    from sam_med3d.training import preprocess_transforms

    label = _load_channel_first(path)
    for t in preprocess_transforms(spacing_mm, load=False, keys=("label",)):
        label = t({"label": label})["label"]
    if tuple(label.shape) != tuple(image.shape) or not np.allclose(np.asarray(label.affine),
                                                                     np.asarray(image.affine), atol=1e-4):
        label = ResampleToMatch(mode="nearest")(label, img_dst=image)
    arr = np.rint(np.asarray(label[0].detach().cpu().numpy() if hasattr(label, "detach") else label[0]))
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    return arr.astype(np.uint8 if lo >= 0 and hi <= 255 else np.int16 if -32768 <= lo and hi <= 32767 else np.int32)


def value_counts(label: np.ndarray) -> Dict[str, int]:
    """``{value: voxels}`` of an integer label array (values present only)."""
    if label.size and label.min() >= 0:
        counts = np.bincount(label.reshape(-1).astype(np.int64, copy=False))
        return {str(v): int(counts[v]) for v in np.flatnonzero(counts)}
    values, counts = np.unique(label, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts)}


def _bbox(mask: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    if not mask.any():
        return None
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        lo.append(hit[0])
        hi.append(hit[-1] + 1)
    return np.asarray(lo), np.asarray(hi)


def prepare_entry(entry: Entry, cases: Sequence[Any], layout: CacheLayout) -> Dict[str, Any]:
    """Decode and store one entry (see the module docstring); returns its progress record."""
    slots: "OrderedDict[str, List[int]]" = OrderedDict()  # content hash -> positions in entry.cases
    for pos, image_path in enumerate(entry.images):
        slots.setdefault(sha1_of_file(image_path), []).append(pos)
    header: Dict[str, Any] = {"format": "sam_med3d_prepared_entry", "version": CACHE_VERSION, "key": entry.key,
                              "spacing_mm": layout.spacing_mm, "margin": layout.margin, "images": [], "labels": []}
    images: List[np.ndarray] = []
    labels: List[np.ndarray] = []
    for slot, (digest, positions) in enumerate(slots.items()):
        first = cases[entry.cases[positions[0]]]
        try:
            image, integer = decode_image(first.image, layout.spacing_mm)
        except Exception as err:
            raise RuntimeError(f"decoding image {first.image} failed: {err}") from err
        volume = np.asarray(image[0].detach().cpu().numpy())
        # One full-size label at a time: keep only its bounding-box crop, counts and box.
        kept = []
        for pos in positions:
            case = cases[entry.cases[pos]]
            try:
                lab = decode_label(case.label, layout.spacing_mm, image)
            except Exception as err:
                raise RuntimeError(f"decoding label {case.label} (image {case.image}) failed: {err}") from err
            box = _bbox(lab > 0)
            crop = lab[box[0][0]:box[1][0], box[0][1]:box[1][1], box[0][2]:box[1][2]] if box else lab[:0, :0, :0]
            kept.append((pos, case, box, value_counts(lab), np.ascontiguousarray(crop)))
            del lab
        boxes = [k[2] for k in kept if k[2] is not None]
        if boxes:
            lo = np.maximum(np.min([b[0] for b in boxes], 0) - layout.margin, 0)
            hi = np.minimum(np.max([b[1] for b in boxes], 0) + layout.margin, volume.shape)
        else:  # nothing labelled: no target can use this image
            lo, hi = np.zeros(3, int), np.zeros(3, int)
        frame = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        dtype = storage_dtype(frame, integer)
        images.append(to_storage(frame, dtype))
        header["images"].append({"files": sorted({file_ident(cases[entry.cases[p]].image, cases[entry.cases[p]].root)
                                                  for p in positions}),
                                 "sha1": digest, "volume_shape": list(volume.shape), "frame_lo": lo.tolist(),
                                 "shape": list(frame.shape), "dtype": dtype.name})
        del volume, frame, image
        for pos, case, box, counts, crop in kept:
            rel_lo = (box[0] - lo).tolist() if box is not None else [0, 0, 0]
            labels.append(crop)
            header["labels"].append({"position": pos, "case": file_ident(case.label, case.root), "image": slot,
                                     "lo": [int(v) for v in rel_lo], "shape": list(crop.shape),
                                     "dtype": crop.dtype.name, "counts": counts})
    nbytes = write_entry(layout.entry_path(entry.key), header, images, labels)
    return record_of(header, nbytes)


def recover_record(layout: CacheLayout, key: str) -> Optional[Dict[str, Any]]:
    """The record of an entry file that exists but is not in a progress file (a process stopped between the two
    writes): read from its header, without decoding anything."""
    path = layout.entry_path(key)
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            header, _ = read_header(f)
    except (ValueError, json.JSONDecodeError):
        return None
    return record_of(header, path.stat().st_size)


# ------------------------------------------------------------------------------------------------ training side
class CacheNotPrepared(ValueError):
    """The cache lacks entries that training needs."""


def prepared_records(layout: CacheLayout, entries: Sequence[Entry], hint: str = "") -> Dict[str, Dict[str, Any]]:
    """Every entry's record, or :class:`CacheNotPrepared` naming how many are missing, some of their images, and
    ``hint`` (the command that prepares them)."""
    records = layout.read_progress()
    missing = [e for e in entries if e.key not in records]
    if missing:
        examples = ", ".join(e.images[0] for e in missing[:3])
        raise CacheNotPrepared(
            f"the training cache {layout.dir} is not prepared for {len(missing)} of {len(entries)} images "
            f"(e.g. {examples}){'; ' + hint if hint else ''}")
    return {e.key: records[e.key] for e in entries}


def iter_labels(entries: Sequence[Entry], records: Mapping[str, Mapping[str, Any]]
                ) -> Iterable[Tuple[int, str, int, Mapping[str, Any]]]:
    """(case index, entry key, label index in the entry, label record) for every case."""
    for entry in entries:
        for label_index, meta in enumerate(records[entry.key]["labels"]):
            yield entry.cases[int(meta["position"])], entry.key, label_index, meta
