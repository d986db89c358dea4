"""The ``/infer/sam_med3d`` task: viewer clicks -> SAM-Med3D mask -> merged label map on the image's grid.

A thin MONAI Label ``InferTask`` (type ``deepedit``, so 3D Slicer and OHIF show their click tools for it)
over :class:`sam_med3d.predictor.Sam3DPredictor`; all model logic (orientation, 1.5 mm crop around the
clicks, encoder/decoder, paste-back) lives in the ``sam_med3d`` package.

Per request:

1. read the clicks (:mod:`lib.infers.viewer_clicks`: Slicer's and OHIF's shapes) and refuse bad input with an
   :class:`~lib.errors.InvalidRequest` (HTTP 422, JSON ``{"detail": "..."}``);
2. take the image's session from the cache (a follow-up click reuses the predictor, whose embedding cache
   skips the image encoder when the crop is unchanged) or load the scan and start one; each client
   (``client_id``, see :mod:`lib.infers.fields`) has its own label map and click states in it
   (:mod:`lib.infers.sessions`), so annotators of the same image never see each other's unsaved labels;
3. run the predictor for each label to update, and merge its mask into the session's label map: the label's
   old voxels are cleared, the new mask is written only where no other label is, so other labels survive;
4. write the label map with the scan's shape and affine (NIfTI by default; the viewer's ``result_extension``
   / ``result_dtype`` are honoured, e.g. OHIF's NRRD) and return timings and ``encoder_ran`` in the JSON.

The served weights are checked on every request (:class:`lib.served_model.ServedModel`); when training
publishes new weights the model is reloaded and the session cache cleared (their embeddings are stale).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.errors import InvalidRequest
from lib.infers.viewer_clicks import LabelClicks, check_inside, has_clicks, label_names_present, parse_clicks
from lib.infers.fields import UPLOADED_IMAGE, UPLOADED_LABEL, check_result_format, client_id
from lib.infers.result_writer import write_result
from lib.infers.sessions import ImageSession, SessionCache, session_key
from lib.served_model import ServedModel
from lib.validation import read_label_map

logger = logging.getLogger(__name__)


def _refusal(err: ValueError) -> InvalidRequest:
    """A file the core refused: 413 for the voxel cap, 422 otherwise."""
    from sam_med3d.io import ScanTooLarge

    if isinstance(err, ScanTooLarge):
        return InvalidRequest(f"{err}; this server accepts at most --conf max_voxels voxels: crop or downsample it",
                              status_code=413)
    return InvalidRequest(f"cannot segment this image: {err}")


def _clear(view: np.ndarray, value: int) -> None:
    """Set the voxels of ``value`` in ``view`` (a box of a label map) to 0, in place.

    Branch-free arithmetic (``view *= view != value``): ``np.copyto(where=)`` with a scalar slows down on masks
    with many edges (a noisy mask: 50 ms instead of 20 ms on a 245x245x240 box), and ``np.putmask`` on a strided
    view was 40x slower still."""
    np.multiply(view, np.not_equal(view, value), out=view, casting="unsafe")


def _paint(view: np.ndarray, mask: np.ndarray, value: int) -> None:
    """Write ``value`` into ``view`` where ``mask`` (0/1, the shape of ``view``) is set and no label is yet, in
    place; other labels' voxels are left as they are. Branch-free, like :func:`_clear`."""
    free = np.equal(view, 0)
    np.logical_and(free, mask, out=free)
    add = free.view(np.uint8)
    add *= np.uint8(value)
    np.add(view, add, out=view)


class SamMed3DInfer(InferTask):
    """Interactive SAM-Med3D segmentation for MONAI Label (see the module docstring).

    Args:
        served: the model holder (base or fine-tuned weights, reloaded on change).
        labels: ``{name: value}`` including ``"background": 0``.
        cache_size: maximum number of images with a live session.
        cache_ttl_s: seconds after its last click before a session is dropped.
        max_voxels: largest scan or label accepted, judged from the file's header (413 beyond); DICOM series too.
        cache_max_bytes: estimated memory the sessions may hold together (None: no bound).
        result_compress: gzip NRRD results for requests without ``result_compress``.
    """

    def __init__(self, served: ServedModel, labels: Mapping[str, int], cache_size: int, cache_ttl_s: float,
                 description: str = "SAM-Med3D: promptable 3D segmentation from foreground/background clicks",
                 extension: Optional[Any] = None, max_voxels: int = 2 ** 28,
                 cache_max_bytes: Optional[int] = None, result_compress: bool = False):
        # No per-request config: the viewers echo "config" back in every request, and the cache settings
        # (--conf cache_size / cache_ttl_s) are server-wide.
        super().__init__(type=InferType.DEEPEDIT, labels=dict(labels), dimension=3, description=description)
        self.served = served
        self.label_values: Dict[str, int] = dict(labels)
        self.sessions = SessionCache(cache_size, cache_ttl_s, max_bytes=cache_max_bytes)
        self.extension = extension  # sam_med3d.extension.ExtensionConfig (None: the predictor's default)
        self.max_voxels = int(max_voxels)  # largest scan accepted (--conf max_voxels)
        self.result_compress = bool(result_compress)  # when the request does not say (--conf result_compress)
        self._lock = threading.RLock()

    # ----------------------------------------------------------------------------------------- MONAI Label API
    def is_valid(self) -> bool:
        return True

    def get_path(self, validate: bool = True) -> Optional[str]:
        """The weights file served now (``GET /model/sam_med3d`` downloads it)."""
        path = self.served.path()
        return str(path) if (not validate or path.is_file()) else None

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info["model_file"] = str(self.served.path())
        if self.served.problem:  # a published file that could not be loaded: the weights before it are served
            info["model_problem"] = self.served.problem
        return info

    def warm_up(self) -> None:
        """Load the model now (server start) instead of on the first click, and write one tiny NRRD: ITK's
        Python modules load lazily on first use, which added 2.5 s to the first OHIF click."""
        with self._lock:
            self.served.get()
        path = self._write({"result_extension": ".nrrd", "result_dtype": "uint8"}, "warm_up",
                           np.zeros((2, 2, 2), dtype=np.uint8), np.eye(4))
        os.unlink(path)

    # -------------------------------------------------------------------------------------------- one request
    def __call__(self, request: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
        begin = time.perf_counter()
        image_path = request.get("image")
        if not isinstance(image_path, str) or not image_path or not os.path.exists(image_path):
            # MONAI Label has already turned an unknown image id into "" by now.
            what = f"image {image_path!r}" if image_path else "the requested image id"
            raise InvalidRequest(f"{what} was not found in the datastore; pass the id of an image listed by "
                                 "GET /datastore/ or upload the image")
        check_result_format(request)  # before any work: a bad result_* field is a 422, not a writer's 500
        client = client_id(request)
        uploaded_image = bool(request.get(UPLOADED_IMAGE))
        # Only a file uploaded with this request is a label file (lib.upstream_fixes.task_routes says which); a "label" naming a
        # server path is just an unknown label name.
        label_file = request.get(UPLOADED_LABEL) if isinstance(request.get(UPLOADED_LABEL), str) else None
        clicks_request = dict(request)
        if label_file is not None and clicks_request.get("label") == label_file:
            clicks_request.pop("label")  # MONAI Label stores the uploaded file under "label"
        if request.get("save_label") and label_file is None and not has_clicks(clicks_request, self.label_values):
            return self._session_label(request, image_path, begin, client)
        try:
            targets = parse_clicks(clicks_request, self.label_values)
        except ValueError as err:
            raise InvalidRequest(str(err)) from err
        key = session_key(image_path)

        with self._lock:
            try:
                model, reloaded = self.served.get()
                if reloaded:
                    self.sessions.clear()
                image_session, load_timings = self._session(image_path, model)
                session = image_session.for_client(client)
                try:
                    check_inside(targets, session.scan.shape)
                except ValueError as err:
                    raise InvalidRequest(str(err)) from err
                if label_file is not None:
                    session.label_map = read_label_map(label_file, session.scan.shape, self.max_voxels,
                                                       "the label sent with the request")
                    session.fresh = False
                per_label, timings = self._predict(session, targets)
                tuned = self.served.path() != self.served.base.path
                for name, entry in per_label.items():
                    # Which weights answered: fine-tuned ones answer the labels they were trained on (--conf
                    # finetuned_for), the base weights the others.
                    entry["weights"] = "fine-tuned" if tuned and session.predictor.answers(name) else "base"
                image_session.set_label_map(client, session.label_map)
                label_map = session.label_map
                names = label_names_present(label_map, self.label_values, self._label_boxes(session))
                start = time.perf_counter()
                # Written while the map cannot change (the same client's next click waits): no copy of the map.
                result_file = self._write(request, image_path, label_map, session.scan.affine)
                timings["write"] = time.perf_counter() - start
            finally:
                if uploaded_image:  # a temporary file, deleted after this request: keep no session for it
                    self.sessions.discard(key)

        timings.update(load_timings)
        timings["total"] = time.perf_counter() - begin
        pre_s = sum(load_timings.values())

        encoder_ran = any(v["encoder_ran"] for v in per_label.values())
        result = {
            "label_names": names,
            "encoder_ran": encoder_ran,
            "labels_updated": list(per_label),
            "sam_med3d": per_label,
            "model": {"file": str(self.served.path()), "arch": self.served.arch},
            "timings": {k: round(float(v), 4) for k, v in timings.items()},
            # MONAI Label's own latency keys, which its clients log.
            "latencies": {"pre": round(pre_s, 3), "infer": round(timings.get("predict", 0.0), 3),
                          "write": round(timings["write"], 3), "total": round(timings["total"], 3)},
            "centroids": {},  # OHIF v3 reads this key from every result
        }
        logger.info("SAM-Med3D %s (%s): labels %s, encoder %s, %.3f s", os.path.basename(image_path), client,
                    list(per_label), "ran" if encoder_ran else "cached", timings["total"])
        return result_file, result

    def _session_label(self, request: Mapping[str, Any], image_path: str, begin: float,
                       client: str) -> Tuple[str, Dict[str, Any]]:
        """``client``'s session label map of the image unchanged, for a request with ``save_label`` and no clicks.

        This is how a viewer without a save button (the OHIF bundled with MONAI Label 0.8.5) saves what it
        shows: MONAI Label saves the returned file under ``label_tag`` (``final``: the label training uses).
        Only the requesting client's map is returned, never another annotator's unsaved work.
        """
        with self._lock:
            session = self.sessions.get_saved_work(session_key(image_path))  # also drawn before new weights
            mine = session.for_client(client) if session is not None and session.has_client(client) else None
            if mine is None:
                raise InvalidRequest("nothing to save: this image has no clicks from this client in the server's "
                                     "current session (sessions end when the server restarts or after cache_ttl_s "
                                     "without clicks); click the structures "
                                     "again, then save")
            label_map = mine.label_map
            if not label_map.any():
                raise InvalidRequest("nothing to save: the image's label map is empty")
            names = label_names_present(label_map, self.label_values, self._label_boxes(mine))
            result_file = self._write(request, image_path, label_map, mine.scan.affine)
        logger.info("SAM-Med3D %s (%s): session label map returned for saving (%s)", os.path.basename(image_path),
                    client, ", ".join(n for n in names if n != "background"))
        return result_file, {"label_names": names, "encoder_ran": False, "labels_updated": [], "sam_med3d": {},
                             "saved_from_session": True, "model": {"file": str(self.served.path()),
                                                                   "arch": self.served.arch},
                             "timings": {"total": round(time.perf_counter() - begin, 4)}, "centroids": {}}

    # ------------------------------------------------------------------------------------------------ helpers
    def _session(self, image_path: str, model: Any) -> Tuple[ImageSession, Dict[str, float]]:
        """The cached session of ``image_path`` (no load timings) or a new one (``load``, ``set_image`` in s)."""
        key = session_key(image_path)
        session = self.sessions.get(key)
        if session is not None:
            return session, {}
        from sam_med3d.io import load_scan

        start = time.perf_counter()
        try:
            # Headers naming other files and scans over the cap (from the header, nothing decoded) are refused.
            scan = load_scan(image_path, max_voxels=self.max_voxels)
        except ValueError as err:  # unreadable, 2D, 4D, constant... (load_scan names the file and the problem)
            raise _refusal(err) from err
        loaded = time.perf_counter()
        from sam_med3d.predictor import Sam3DPredictor

        predictor = Sam3DPredictor(model, device=self.served.device,
                                   **({} if self.extension is None else {"extension": self.extension}))
        predictor.set_image(scan)
        # No initial map: each client's starts as zeros (made Fortran-ordered, for free, by _label_boxes).
        answers = self.served.structures()  # fine-tuned weights answer only the labels they were trained on
        session = ImageSession(scan=scan, predictor=predictor, answers=answers,
                               base_model=None if answers is None else self.served.base_model())
        self.sessions.put(key, session)
        return session, {"load": loaded - start, "set_image": time.perf_counter() - loaded}

    def _predict(self, session: ImageSession, targets: list) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, float]]:
        """Run the predictor for each target label and merge its mask into ``session.label_map``.

        The merge touches only boxes, never the whole map (78 M voxels on a 512x512x300 CT): the label's old
        voxels are cleared inside the box where it was last written (the whole map the first time a label
        meets a map this task did not fill itself, e.g. one uploaded with the request), and the new mask is
        written inside the crop's region only, where no other label is. The map is kept in Fortran order (i
        fastest, as NRRD and NIfTI store it), so the result file is written without reordering.
        """
        per_label: Dict[str, Dict[str, Any]] = {}
        timings: Dict[str, float] = {"merge": 0.0}
        start = time.perf_counter()
        boxes = self._label_boxes(session)
        for target in targets:
            target: LabelClicks
            # The predictor gets the full click list and itself tells new clicks from edited ones.
            try:
                out = session.predictor.predict(target.points, target.point_labels, label_key=target.name)
            except ValueError as err:  # the predictor's own input checks
                raise InvalidRequest(f"label {target.name!r}: {err}") from err
            tick = time.perf_counter()
            label_map = session.label_map
            old = boxes.get(target.value, (slice(None),) * 3)  # unknown: anywhere
            if old is not None:
                _clear(label_map[old], target.value)
            region, box = out.region_ijk, None
            if region is not None:
                # The mask's own bounding box inside the crop's region: a small structure costs its size.
                region_mask = np.asarray(out.region_mask)
                found = [np.flatnonzero(region_mask.any(axis=tuple(a for a in range(3) if a != p)))
                         for p in range(3)]
                if all(len(f) for f in found):
                    local = tuple(slice(int(f[0]), int(f[-1]) + 1) for f in found)
                    box = tuple(slice(r.start + b.start, r.start + b.stop) for r, b in zip(region, local))
                    _paint(label_map[box], region_mask[local], target.value)
            voxels = 0 if box is None else int(np.count_nonzero(out.region_mask))
            boxes[target.value] = box
            timings["merge"] += time.perf_counter() - tick
            for name, seconds in dict(out.timings or {}).items():
                if name != "total":
                    timings[name] = timings.get(name, 0.0) + float(seconds)
            crops = len(getattr(out, "crop_boxes", ())) or 1  # > 1: a structure larger than one crop
            timings["crops"] = timings.get("crops", 0.0) + crops  # the JSON's total over the labels, as before
            iou = float(out.iou) if out.iou is not None else float("nan")
            per_label[target.name] = {
                "value": target.value,
                "clicks": int(len(target.points)),
                "encoder_ran": bool(out.encoder_ran),
                "crops": crops,
                "iou": iou if np.isfinite(iou) else None,  # JSON has no NaN
                "voxels": voxels,
            }
        timings["predict"] = time.perf_counter() - start
        return per_label, timings

    def _label_boxes(self, session: Any) -> Dict[int, Optional[Tuple[slice, slice, slice]]]:
        """``{label value: box of the map where that value may have voxels (None: nowhere)}`` for
        ``session.label_map``, for the box-local merge of :meth:`_predict`; a value missing from it may be
        anywhere. Keyed by the map's identity: a map replaced (e.g. by an uploaded label) starts unknown.

        A map not in Fortran order is replaced by one that is (an all-zero one, as a new client's, for free).
        """
        label_map = session.label_map
        if not label_map.flags.f_contiguous:
            fresh = not label_map.any()
            session.label_map = np.zeros(label_map.shape, np.uint8, order="F") if fresh \
                else np.asfortranarray(label_map, dtype=np.uint8)
            label_map = session.label_map
        else:
            fresh = bool(getattr(session, "fresh", False))  # a new client's all-zero map
        known = self.__dict__.setdefault("_written_boxes", {})  # id(map) -> (weak reference, boxes, complete)
        entry = known.get(id(label_map))
        if entry is None or entry[0]() is not label_map:
            reference = weakref.ref(label_map, lambda _, key=id(label_map): known.pop(key, None))
            entry = known[id(label_map)] = (reference, {}, fresh)
        _, boxes, complete = entry
        if complete:
            for value in self.label_values.values():
                boxes.setdefault(int(value), None)
        return boxes

    def _write(self, request: Mapping[str, Any], image_path: str, label_map: np.ndarray, affine: np.ndarray) -> str:
        """Write ``label_map`` with ``affine`` to a temporary file in the format the client asked for
        (:func:`lib.infers.result_writer.write_result`: NRRD and NIfTI directly, other formats via MONAI Label);
        ``result_compress`` from ``--conf`` when the request has none."""
        if "result_compress" not in request:
            request = {**request, "result_compress": getattr(self, "result_compress", False)}
        return write_result(request, image_path, label_map, affine)
