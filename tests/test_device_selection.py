"""Device handling without a GPU: which device each component picks, and that the model and the predictor's
torch steps create no tensor on a hard-coded device.

The second part runs on *fake* CUDA tensors (``torch._subclasses.fake_tensor.FakeTensorMode``): they carry a
``cuda:0`` device and shapes but no data, so this CPU-only machine can execute the encoder, prompt encoder,
mask decoder and a click through the predictor "on CUDA" (only CUDA tensors are fake there: the predictor
prepares its crop from a real scan on the CPU). A tensor created on the CPU by mistake (a ``torch.zeros(...)``
without ``device=``) meets a CUDA one and raises ``FakeTensorDeviceMismatchError``, the error a real GPU would
give; the last test shows the check catches exactly that.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorDeviceMismatchError, FakeTensorMode
from torch.utils._pytree import tree_leaves, tree_map_only

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "sam_med3d"


# ------------------------------------------------------------------------------------------------ selection
@pytest.fixture
def app_options(monkeypatch):
    monkeypatch.syspath_prepend(str(APP_DIR))
    sys.modules.pop("lib", None)
    from lib import options

    yield options
    for name in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
        sys.modules.pop(name, None)


def test_app_device_auto_follows_cuda_availability(app_options, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert app_options.resolve_device("auto") == "cpu"
    assert app_options.resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="no CUDA device is available"):
        app_options.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert app_options.resolve_device("auto") == "cuda"
    assert app_options.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        app_options.resolve_device("cuda:2")
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda' or 'cuda:N'"):
        app_options.resolve_device("tpu")


def test_pretrain_device_selection(monkeypatch):
    from pretrain import distributed as pdist

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pdist.setup("auto").device == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        pdist.setup("cuda")
    with pytest.raises(ValueError, match="--device must be"):
        pdist.setup("gpu")


def test_pretrain_accepts_a_numbered_gpu_and_makes_it_current(monkeypatch):
    """``--device cuda:1``: the run's tensors, synchronize calls and NCCL use GPU 1 (the current device)."""
    from pretrain import distributed as pdist
    from pretrain.train import parse_args

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    args = parse_args(["--config", "c.yaml", "--data", "d", "--output", "o", "--device", "cuda:1"])
    ctx = pdist.setup(args.device)
    assert ctx.device == torch.device("cuda", 1) and current == [1]
    assert pdist.setup("cuda").device == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="GPU 2 .* does not exist: only 2 visible"):
        pdist.setup("cuda:2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="names one GPU but 2 processes run on this node"):
        pdist.setup("cuda:1")


def test_predictor_and_loaded_model_use_the_requested_device(tmp_path):
    from sam_med3d import Sam3DPredictor, build_sam_med3d, load_model, save_checkpoint

    model = build_sam_med3d("vit_mini")
    path = save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_model(path, device=torch.device("cpu"))
    assert {p.device for p in loaded.parameters()} == {torch.device("cpu")}
    predictor = Sam3DPredictor(loaded, device="cpu")
    assert predictor.device == torch.device("cpu") and loaded.device == torch.device("cpu")


# ------------------------------------------------------------------------------------------- fake CUDA runs
class _FakeCuda(FakeTensorMode):
    """Fake tensors for CUDA only: a tensor made on (or moved to) ``cuda`` is fake, and so is anything computed
    from one; work on real CPU tensors alone runs for real. The predictor can then prepare a crop from a real
    scan (its intensity statistics read values, which fake tensors do not have) and hand it to a CUDA model.
    A real CPU tensor that meets a CUDA one is made a fake CPU tensor and fails the device check, as on a GPU."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        to_cuda = any(isinstance(a, torch.device) and a.type == "cuda" for a in leaves)
        if not to_cuda and not any(isinstance(a, FakeTensor) for a in leaves):
            return func(*args, **kwargs)  # this mode is off while it dispatches: a real CPU op
        args, kwargs = tree_map_only(torch.Tensor, lambda t: t if isinstance(t, FakeTensor) else self.from_tensor(t),
                                     (args, kwargs))
        return super().__torch_dispatch__(func, types, args, kwargs)


# One mode for every test here: the encoder caches its relative-position index tensors per device, and a fake
# tensor only works with the mode that made it.
FAKE_CUDA = _FakeCuda()


def _fake_cuda_model(arch: str = "vit_mini"):
    from sam_med3d import build_sam_med3d

    with FAKE_CUDA, torch.device("cuda"):
        model = build_sam_med3d(arch).eval()
    # Module.to cannot swap fake parameters in place; the model is on (fake) CUDA already.
    model.to = lambda *args, **kwargs: model
    return model


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_model_runs_on_cuda_without_cpu_tensors(impl):
    model = _fake_cuda_model()
    model.image_encoder.set_attention_impl(impl)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    n = model.img_size
    with FAKE_CUDA, torch.no_grad():
        image = torch.zeros(1, 1, n, n, n, device="cuda")
        embedding = model.image_encoder(image)
        points = (torch.zeros(1, 3, 3, device="cuda"), torch.tensor([[1, 0, 1]], device="cuda"))
        for mask_input in (None, torch.zeros(1, 1, n // 4, n // 4, n // 4, device="cuda")):
            for multimask in (False, True):
                logits, iou = model.decode(embedding, points, mask_input, multimask_output=multimask)
                assert logits.device.type == "cuda" and iou.device.type == "cuda"
                assert logits.shape[-3:] == (n // 4,) * 3


def test_a_click_on_a_cuda_model_keeps_the_predictors_tensors_on_the_model_device(monkeypatch):
    """The predictor's own torch code on a CUDA model, through a click: the crop (prepared on the CPU) moved to
    the model's device, the encoder timer waiting on that device, the click tensors and the first step's empty
    mask prompt made there."""
    import sam_med3d.predictor as predictor_module
    from sam_med3d import Sam3DPredictor

    waited = []
    monkeypatch.setattr(predictor_module, "synchronize", waited.append)  # no real GPU to wait for
    model = _fake_cuda_model()
    seen = {}
    model.image_encoder.register_forward_hook(
        lambda module, inputs, output: seen.update(image=inputs[0].device.type, embedding=output.device.type))
    real_decode = model.decode

    class Decoded(Exception):
        """Stops the click after the decoder: the predictor then reads the IoU as a float, which fake tensors
        lack."""

    def decode(embedding, points, mask_input, multimask_output=False):
        logits, iou = real_decode(embedding, points, mask_input, multimask_output)
        seen.update(points=[t.device.type for t in points], mask_input=mask_input.device.type,
                    logits=logits.device.type, iou=iou.device.type)
        raise Decoded

    model.decode = decode
    scan = np.random.default_rng(0).normal(size=(40, 40, 40)).astype(np.float32)
    with FAKE_CUDA:
        predictor = Sam3DPredictor(model, device="cuda", extension=False)
        predictor.set_image(scan, affine=np.eye(4))
        with pytest.raises(Decoded):
            predictor.predict(np.array([[20.0, 20.0, 20.0]]), [1])
    assert predictor.encoder_runs == 1 and waited == [torch.device("cuda")]
    assert seen == {"image": "cuda", "embedding": "cuda", "points": ["cuda", "cuda"], "mask_input": "cuda",
                    "logits": "cuda", "iou": "cuda"}


def test_fake_cuda_check_catches_a_tensor_created_on_the_cpu():
    """The check above can fail: code that forgets ``device=`` breaks on a CUDA model."""

    class Forgetful(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.scale + torch.zeros(4)  # created on the CPU whatever the model's device

    with FAKE_CUDA, torch.device("cuda"):
        module = Forgetful()
    with FAKE_CUDA, pytest.raises(FakeTensorDeviceMismatchError):
        module(torch.ones(4, device="cuda"))


# ------------------------------------------------------------------------------------------------ click timings
class _SlowEncoder(torch.nn.Module):
    """An encoder whose work takes ``seconds`` (as a GPU kernel still running after the call returned would)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, image):
        import time

        time.sleep(self.seconds)
        return image


def test_synchronize_waits_for_the_given_cuda_device_only(monkeypatch):
    from sam_med3d.device import synchronize

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    synchronize("cpu")
    synchronize(torch.device("cuda", 1))
    synchronize("cuda:0")
    assert waited == [torch.device("cuda", 1), torch.device("cuda", 0)]


def test_encode_timer_waits_for_the_model_device(monkeypatch):
    """The encoder's kernels are asynchronous on a GPU: the encode timer must include waiting for them, on the
    model's device (not the current one); otherwise the encoder's time shows up in decode."""
    import time

    from sam_med3d import Sam3DPredictor, build_sam_med3d
    import sam_med3d.predictor as predictor_module

    queued_s = 0.3
    waited = []

    def gpu_still_busy(device):  # what torch.cuda.synchronize does while the encoder's kernels run
        waited.append(torch.device(device))
        time.sleep(queued_s)

    monkeypatch.setattr(predictor_module, "synchronize", gpu_still_busy)
    predictor = Sam3DPredictor(build_sam_med3d("vit_mini"), device="cpu", extension=False)
    predictor.set_image(np.random.default_rng(0).normal(size=(40, 40, 40)).astype(np.float32), affine=np.eye(4))
    result = predictor.predict(np.array([[20.0, 20.0, 20.0]]), [1])
    assert result.encoder_ran and waited == [predictor.device]
    assert result.timings["encode"] >= queued_s


def test_preprocess_and_encode_times_add_up_over_the_crops_of_a_click(data_dir):
    """With the extension one click encodes several crops: the split reports their sum, not the last one."""
    from extension_helpers import CropAwarePredictor, GroundTruthSam3D
    from sam_med3d.extension import ExtensionConfig

    folder = data_dir / "totalseg_ct_multiorgan"
    import json

    import nibabel as nib

    labels = json.loads((folder / "dataset.json").read_text())["labels"]
    colon_value = int(labels["colon"]) if "colon" in labels else int({v: k for k, v in labels.items()}["colon"])
    gt = np.asarray(nib.load(str(folder / "labelsTr" / "example_ct.nii.gz")).dataobj) == colon_value
    per_crop_s = 0.1
    predictor = CropAwarePredictor(GroundTruthSam3D(gt, encoder=_SlowEncoder(per_crop_s)),
                                   extension=ExtensionConfig(max_crops=3))
    predictor.set_image(folder / "imagesTr" / "example_ct.nii.gz")
    click = np.argwhere(gt)[len(np.argwhere(gt)) // 2][None].astype(float)
    result = predictor.predict(click, [1])
    crops = len(result.crop_boxes)
    assert crops >= 2 and predictor.encoder_runs == crops
    assert result.timings["encode"] >= crops * per_crop_s
    assert result.timings["preprocess"] > 0


# ------------------------------------------------------------------------------------------------ click simulation
@pytest.fixture
def no_host_copies(monkeypatch):
    """Fail any ``Tensor.cpu()`` / ``Tensor.numpy()``: on a GPU each is a device-to-host copy of a whole mask
    (2M voxels at 128^3) per click, which would bound GPU training by the CPU."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"host copy of a {tuple(self.shape)} tensor")

    monkeypatch.setattr(torch.Tensor, "cpu", refuse)
    monkeypatch.setattr(torch.Tensor, "numpy", refuse)


def _masks(seed: int, batch: int = 3, size: int = 20):
    rng = np.random.default_rng(seed)
    gt = np.zeros((batch, 1, size, size, size), bool)
    pred = np.zeros_like(gt)
    for b in range(batch):
        lo = rng.integers(0, size // 2, 3)
        gt[(b, 0) + tuple(slice(int(a), int(a) + size // 3) for a in lo)] = True
        pred[b, 0] = rng.random((size,) * 3) < 0.02 if b else gt[b, 0]  # item 0: nothing left to correct
    gt[-1] = False  # an empty target: the padding click
    return pred, gt


def test_random_clicks_on_tensors_stay_on_the_device_and_match_the_numpy_protocol(no_host_copies):
    from sam_med3d.clicks import random_error_click, simulate_clicks_batch

    for seed in range(5):
        pred, gt = _masks(seed)
        points, labels = simulate_clicks_batch(torch.from_numpy(pred), torch.from_numpy(gt),
                                               np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        for b in range(len(gt)):
            click = random_error_click(pred[b, 0], gt[b, 0], rng) if gt[b].any() else None
            if click is None:
                assert labels[b, 0] == -1 and points[b, 0].tolist() == [0, 0, 0]
            else:
                assert points[b, 0].tolist() == click[0].tolist() and int(labels[b, 0]) == click[1]


def test_click_iterations_copy_no_mask_to_the_host(no_host_copies):
    from sam_med3d import build_sam_med3d
    from sam_med3d.training import run_click_iterations

    torch.manual_seed(0)
    sam = build_sam_med3d("vit_mini").eval()
    n = sam.img_size
    label = torch.zeros(1, 1, n, n, n)
    label[..., 10:30, 12:28, 20:40] = 1
    with torch.no_grad():
        out = run_click_iterations(sam, torch.randn(1, 1, n, n, n), label, 3, np.random.default_rng(0))
    assert out["points"].shape == (1, 3, 3)
