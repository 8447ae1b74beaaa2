"""Neural-network annotators: official key layouts, loading through find_weights, outputs, errors.

The official weights cannot be downloaded here, so every network runs on random weights saved to a
temporary folder under the official file name and in the official container format.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrlnet.annotators import hed, lineart, lineart_anime, mlsd, openpose, pidinet, weights
from ctrlnet.annotators.registry import run_annotator
from ctrlnet.annotators.weights import MissingWeightsError, WeightsError, find_weights, load_into, load_model

DATA = Path(__file__).parent / "data"
KEYS = json.loads((DATA / "annotator_keys.json").read_text())["files"]

ARCH = {
    "ControlNetHED.pth": hed.ControlNetHED,
    "table5_pidinet.pth": pidinet.PiDiNet,
    "mlsd_large_512_fp32.pth": mlsd.MLSDLarge,
    "body_pose_model.pth": openpose.BodyPoseNet,
    "hand_pose_model.pth": openpose.HandPoseNet,
    "sk_model.pth": lineart.LineartGenerator,
    "sk_model2.pth": lineart.LineartGenerator,
    "netG.pth": lineart_anime.UnetGenerator,
}
NETWORK_ANNOTATORS = [
    "hed",
    "softedge_pidinet",
    "mlsd",
    "openpose",
    "openpose_hand",
    "lineart",
    "lineart_coarse",
    "lineart_anime",
]
# One small scale keeps the 6-stage pose network cheap (about 95 GFLOP at the default 0.5 scale).
FAST = {"openpose": {"scales": (0.125,)}, "openpose_hand": {"scales": (0.125,), "hand_scales": (0.25,)}}


def official_keys(filename: str) -> dict[str, list[int]]:
    """Recorded key -> shape, with the DataParallel prefix our loader strips."""
    return {k.removeprefix("module."): s for k, s in KEYS[filename]["keys"]}


def save_official(
    model: torch.nn.Module, folder: Path, filename: str, prefix: str = "", half: bool = False
) -> Path:
    """Write ``model``'s weights the way the official file stores them."""
    sd = {
        prefix + k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()
    }
    container = KEYS[filename]["container"]
    obj = {container: sd, "epoch": 1} if container else sd
    path = folder / filename
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("annotator_weights")
    torch.manual_seed(0)
    for filename, cls in ARCH.items():
        # Official layouts: PiDiNet under 'state_dict' with 'module.' keys; netG also written with the
        # prefix to exercise stripping; HED is stored in fp16 on the hub.
        prefix = "module." if filename in ("table5_pidinet.pth", "netG.pth") else ""
        save_official(cls(), folder, filename, prefix=prefix, half=filename == "ControlNetHED.pth")
    weights.clear_cache()
    return folder


@pytest.fixture(autouse=True)
def no_hub_cache(monkeypatch, tmp_path):
    """Isolate from any real Hugging Face cache or annotator folder on the machine."""
    try:
        from huggingface_hub import constants
    except ImportError:  # no hub client: find_weights skips the cache anyway
        constants = None
    if constants is not None:
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv(weights.ENV_DIR, raising=False)


def rgb(h: int = 97, w: int = 131, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---- key layouts ---------------------------------------------------------------------------------


def test_recorded_keys_match_their_derivation():
    spec = importlib.util.spec_from_file_location("derive_annotator_keys", DATA / "derive_annotator_keys.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.derive()["files"] == KEYS


@pytest.mark.parametrize("filename", sorted(ARCH))
def test_state_dict_equals_official_layout(filename):
    with torch.device("meta"):
        model = ARCH[filename]()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = official_keys(filename)
    assert sorted(set(ours) - set(official)) == []
    assert sorted(set(official) - set(ours)) == []
    assert {k: s for k, s in ours.items() if official[k] != s} == {}


# ---- every network through the registry ----------------------------------------------------------


@pytest.mark.parametrize("name", NETWORK_ANNOTATORS)
def test_runs_on_odd_rgb_gray_and_rgba(name, weights_dir):
    kw = {"weights_dir": weights_dir, **FAST.get(name, {})}
    out = run_annotator(name, rgb(97, 131), **kw)
    assert out.shape == (97, 131, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 2]) or name.startswith("openpose")
    gray = rgb(45, 67, seed=1)[..., 0]
    assert run_annotator(name, gray, **kw).shape == (45, 67, 3)
    rgba = np.dstack([rgb(45, 67, seed=2), np.full((45, 67), 200, np.uint8)])
    out = run_annotator(name, rgba, **kw)
    assert out.shape == (45, 67, 3) and out.dtype == np.uint8


def test_models_are_cached_per_file_device_dtype(weights_dir, monkeypatch):
    weights.clear_cache()
    calls = []
    real = weights.load_state_dict
    monkeypatch.setattr(weights, "load_state_dict", lambda p, **kw: calls.append(p) or real(p, **kw))
    a = load_model("ControlNetHED.pth", hed.ControlNetHED, weights_dir=weights_dir)
    b = load_model("ControlNetHED.pth", hed.ControlNetHED, weights_dir=weights_dir)
    hed.hed(rgb(32, 40), weights_dir=weights_dir)
    assert a is b and len(calls) == 1
    c = load_model("ControlNetHED.pth", hed.ControlNetHED, weights_dir=weights_dir, dtype="bfloat16")
    assert c is not a and next(c.parameters()).dtype == torch.bfloat16 and len(calls) == 2
    assert next(a.parameters()).dtype == torch.float32  # fp16 file converted on load
    assert not next(a.parameters()).requires_grad and not a.training


# ---- outputs with known weights ------------------------------------------------------------------


def _zeroed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def test_hed_output_follows_loaded_weights(tmp_path):
    model = _zeroed(hed.ControlNetHED())
    with torch.no_grad():
        for b in (model.block1, model.block2, model.block3, model.block4, model.block5):
            b.projection.bias.fill_(2.0)
    save_official(model, tmp_path, "ControlNetHED.pth")
    out = hed.hed(rgb(50, 70), weights_dir=tmp_path)
    assert (out == int(255 / (1 + np.exp(-2.0)))).all()  # sigmoid(mean of five 2.0 sides) = 224
    safe = hed.hed(rgb(50, 70), weights_dir=tmp_path, safe=True)
    assert (safe == 255).all()  # safe_step: int(0.88 * 3) / 2 = 1.0


def test_safe_step_levels():
    np.testing.assert_array_equal(hed.safe_step(np.array([0.2, 0.4, 0.7, 0.99])), [0.0, 0.5, 1.0, 1.0])


def test_hed_safe_levels(weights_dir):
    out = hed.hed(rgb(64, 64), weights_dir=weights_dir, safe=True)
    assert set(np.unique(out)) <= {0, 127, 255}


def test_lineart_is_white_lines_on_black(tmp_path):
    model = _zeroed(lineart.LineartGenerator())
    with torch.no_grad():
        model.model4[1].bias.fill_(30.0)  # sigmoid = 1: blank paper everywhere
    save_official(model, tmp_path, "sk_model.pth")
    assert (lineart.lineart(rgb(41, 53), weights_dir=tmp_path) == 0).all()
    model.model4[1].bias.data.fill_(-30.0)  # all ink
    save_official(model, tmp_path, "sk_model2.pth")
    assert (lineart.lineart_coarse(rgb(41, 53), weights_dir=tmp_path) == 255).all()


def test_lineart_anime_is_white_lines_on_black(tmp_path):
    model = _zeroed(lineart_anime.UnetGenerator())
    with torch.no_grad():
        model.model.model[3].bias.fill_(30.0)  # tanh = 1: paper
    save_official(model, tmp_path, "netG.pth")
    # <= 1: the cubic resize back to the input size leaves float noise on a constant 255 map.
    assert (lineart_anime.lineart_anime(rgb(30, 45), weights_dir=tmp_path) <= 1).all()


def test_lineart_anime_skip_carries_activated_input():
    # The original's in-place LeakyReLU makes the skip branch carry the activated input.
    block = lineart_anime.UnetSkipBlock(4, 8, innermost=True).eval()
    x = torch.randn(1, 4, 8, 8)
    out = block(x)
    assert torch.equal(out[:, :4], torch.nn.functional.leaky_relu(x, 0.2))


# ---- PiDiNet pixel-difference convolutions -------------------------------------------------------


def _pdc_direct(x: torch.Tensor, w: torch.Tensor, op: str) -> torch.Tensor:
    """Pixel-difference convolution from its definition (depthwise), via unfold."""
    C = x.shape[1]
    if op == "rd":  # outer 5x5 ring minus inner 3x3 ring, weighted by the 8 non-centre taps
        p = torch.nn.functional.unfold(x, 5, padding=2).reshape(1, C, 25, *x.shape[-2:])
        outer, inner = [0, 2, 4, 10, 14, 20, 22, 24], [6, 7, 8, 11, 13, 16, 17, 18]
        diff = p[:, :, outer] - p[:, :, inner]
        return (diff * w.reshape(C, 9)[None, :, 1:, None, None]).sum(2)
    p = torch.nn.functional.unfold(x, 3, padding=1).reshape(1, C, 9, *x.shape[-2:])
    if op == "cd":  # each tap minus the centre
        diff = p - p[:, :, 4:5]
    else:  # ad: each tap minus its clockwise neighbour
        clockwise = [1, 2, 5, 0, 4, 8, 3, 6, 7]
        diff = p - p[:, :, clockwise]
    return (diff * w.reshape(C, 9)[None, :, :, None, None]).sum(2)


@pytest.mark.parametrize("op", ["cd", "ad", "rd"])
def test_pdc_kernel_equals_definition(op):
    torch.manual_seed(0)
    x, w = torch.randn(1, 5, 11, 13), torch.randn(5, 1, 3, 3)
    k = pidinet.pdc_kernel(w, op)
    ours = torch.nn.functional.conv2d(x, k, padding=k.shape[-1] // 2, groups=5)
    torch.testing.assert_close(ours, _pdc_direct(x, w, op), atol=1e-5, rtol=1e-5)


# ---- M-LSD decoding ------------------------------------------------------------------------------


def test_mlsd_decode_and_draw():
    tp = torch.full((1, 9, 32, 32), -10.0)
    tp[0, 0, 10, 12] = 5.0  # one confident centre at x=12, y=10
    tp[0, 1:5, 10, 12] = torch.tensor([-6.0, 0.0, 6.0, 0.0])  # horizontal, 12 grid units long
    tp[0, 0, 20, 20] = 5.0  # confident but too short: dropped by thr_d
    tp[0, 1:5, 20, 20] = torch.tensor([0.0, 0.0, 0.05, 0.0])
    lines = mlsd.decode_lines(tp, thr_v=0.1, thr_d=0.1)
    np.testing.assert_allclose(lines, [[6.0, 10.0, 18.0, 10.0]])
    assert mlsd.decode_lines(tp, thr_v=0.999, thr_d=0.1).shape == (0, 4)


def test_mlsd_map_is_binary(weights_dir):
    out = mlsd.mlsd(rgb(64, 80), weights_dir=weights_dir, thr_v=0.0, thr_d=0.0)
    assert set(np.unique(out)) <= {0, 255}


# ---- OpenPose post-processing --------------------------------------------------------------------

SKELETON = [
    (60, 30),
    (60, 50),
    (45, 50),
    (35, 70),
    (30, 90),
    (75, 50),
    (85, 70),
    (90, 90),
    (50, 95),
    (48, 120),
    (47, 145),
    (70, 95),
    (72, 120),
    (73, 145),
    (56, 26),
    (64, 26),
    (52, 28),
    (68, 28),
]


def synthetic_maps(H: int, W: int, kps) -> tuple[np.ndarray, np.ndarray]:
    """Heat maps with a Gaussian per keypoint and PAFs filled with the unit limb direction."""
    heat, paf = np.zeros((H, W, 19)), np.zeros((H, W, 38))
    yy, xx = np.mgrid[0:H, 0:W]
    for p, (x, y) in enumerate(kps):
        heat[:, :, p] = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 32.0)
    for (a, b), (ix, iy) in zip(openpose.LIMBS, openpose.PAF_INDEX):
        A, B = np.array(kps[a - 1], float), np.array(kps[b - 1], float)
        u = (B - A) / np.linalg.norm(B - A)
        d = np.stack([xx - A[0], yy - A[1]], -1)
        t, perp = d @ u, np.abs(d @ np.array([-u[1], u[0]]))
        m = (t >= -1) & (t <= np.linalg.norm(B - A) + 1) & (perp <= 2)
        paf[:, :, ix - 19][m], paf[:, :, iy - 19][m] = u[0], u[1]
    return heat, paf


def test_openpose_assembles_one_person():
    heat, paf = synthetic_maps(160, 120, SKELETON)
    peaks = openpose.find_peaks(heat)
    assert [[(x, y) for x, y, _, _ in part] for part in peaks] == [[kp] for kp in SKELETON]
    candidate, subset = openpose.group_people(peaks, *openpose.connect_limbs(peaks, paf, 160))
    assert subset.shape == (1, 20)
    assert subset[0, -1] == 18  # every part found
    assert [tuple(candidate[int(i), :2]) for i in subset[0, :18]] == [
        tuple(map(float, kp)) for kp in SKELETON
    ]


def test_openpose_drawing_colours():
    H, W = 160, 120
    pose = {
        "bodies": {
            "candidate": [[x / W, y / H] for x, y in SKELETON],
            "subset": [list(range(18)) + [30.0, 18]],
        },
        "hands": [[[0.5, 0.5]] + [[-1, -1]] * 20],
    }
    canvas = openpose.draw_pose(pose, H, W)
    for i, (x, y) in enumerate(SKELETON[:14]):
        assert tuple(canvas[y, x]) == tuple(openpose.COLORS[i]), i  # keypoint discs on top, full colour
    assert tuple(canvas[80, 60]) == (0, 0, 255)  # the one visible hand point
    lo, hi = (SKELETON[2][0] + SKELETON[3][0]) // 2, (SKELETON[2][1] + SKELETON[3][1]) // 2
    assert tuple(canvas[hi, lo]) == tuple(
        (np.array(openpose.COLORS[2]) * 0.6).astype(np.uint8)
    )  # limb at 60 %


def test_openpose_hand_pipeline(weights_dir, monkeypatch):
    # Random weights find nobody, so plant a person whose arms give two hand boxes.
    monkeypatch.setattr(openpose, "body_maps", lambda model, bgr, scales: synthetic_maps(160, 120, SKELETON))
    pose = openpose.detect_pose(rgb(160, 120), hands=True, hand_scales=(0.25,), weights_dir=weights_dir)
    assert len(pose["bodies"]["subset"]) == 1
    assert len(pose["hands"]) == 2 and all(np.array(h).shape == (21, 2) for h in pose["hands"])
    hands = np.array(pose["hands"])
    assert ((hands < 0) | ((hands >= 0) & (hands <= 1))).all()  # normalised, -1 when missing


def test_hand_peaks_from_maps():
    maps = np.zeros((128, 128, 22))
    yy, xx = np.mgrid[0:128, 0:128]
    maps[:, :, 3] = np.exp(-((xx - 40) ** 2 + (yy - 90) ** 2) / 50.0)
    maps[:, :, 3] += 0.5 * np.exp(-((xx - 100) ** 2 + (yy - 10) ** 2) / 50.0)  # weaker second blob
    peaks = openpose.hand_peaks_from_maps(maps, Hr=256, Wr=64)
    assert peaks.shape == (21, 2)
    assert tuple(peaks[3]) == (40 * 64 // 128, 90 * 256 // 128)
    assert (peaks[np.arange(21) != 3] == 0).all()


def test_gaussian_filter_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    a = np.random.default_rng(0).normal(size=(37, 50))
    np.testing.assert_allclose(openpose.gaussian_filter(a, 3), ndimage.gaussian_filter(a, 3), atol=1e-12)


# ---- weight files: finding, reading, checking ----------------------------------------------------


def test_missing_weights_names_file_folders_and_url(tmp_path, monkeypatch):
    env_dir = tmp_path / "env_dir"
    monkeypatch.setenv(weights.ENV_DIR, str(env_dir))
    with pytest.raises(MissingWeightsError) as err:
        find_weights("ControlNetHED.pth", weights_dir=tmp_path / "given")
    msg = str(err.value)
    assert "ControlNetHED.pth" in msg and str(tmp_path / "given") in msg and str(env_dir) in msg
    assert "https://huggingface.co/lllyasviel/Annotators/resolve/main/ControlNetHED.pth" in msg
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(MissingWeightsError, match="body_pose_model.pth"):
        run_annotator("openpose", rgb(40, 40), weights_dir=tmp_path / "given")


def test_openpose_hand_needs_the_hand_file(weights_dir, tmp_path):
    (tmp_path / "body_pose_model.pth").symlink_to(weights_dir / "body_pose_model.pth")
    assert run_annotator("openpose", rgb(40, 40), weights_dir=tmp_path, scales=(0.125,)).shape == (40, 40, 3)
    with pytest.raises(MissingWeightsError, match="hand_pose_model.pth"):
        run_annotator("openpose_hand", rgb(40, 40), weights_dir=tmp_path, scales=(0.125,))


def test_find_weights_search_order(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    hub = Path(constants.HF_HUB_CACHE) / "models--lllyasviel--Annotators"
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text("abc123")
    (hub / "snapshots" / "abc123").mkdir(parents=True)
    (hub / "snapshots" / "abc123" / "sk_model.pth").write_bytes(b"x")
    assert find_weights("sk_model.pth") == hub / "snapshots" / "abc123" / "sk_model.pth"
    env_dir, arg_dir = tmp_path / "env", tmp_path / "arg"
    for d in (env_dir, arg_dir):
        d.mkdir()
        (d / "sk_model.pth").write_bytes(b"x")
    monkeypatch.setenv(weights.ENV_DIR, str(env_dir))
    assert find_weights("sk_model.pth") == env_dir / "sk_model.pth"
    assert find_weights("sk_model.pth", weights_dir=arg_dir) == arg_dir / "sk_model.pth"
    assert find_weights("sk_model.pth", weights_dir=arg_dir / "sk_model.pth") == arg_dir / "sk_model.pth"


def test_corrupt_weights_file(tmp_path):
    (tmp_path / "ControlNetHED.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match=r"cannot read weights file .*ControlNetHED\.pth.*corrupt"):
        hed.hed(rgb(32, 32), weights_dir=tmp_path)
    torch.save({"a": 1}, tmp_path / "sk_model.pth")
    with pytest.raises(WeightsError, match="not tensors"):
        lineart.lineart(rgb(32, 32), weights_dir=tmp_path)
    import argparse

    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "netG.pth")
    with pytest.raises(WeightsError, match=r"refuses.*argparse\.Namespace"):
        lineart_anime.lineart_anime(rgb(32, 32), weights_dir=tmp_path)


def test_wrong_key_and_shape_are_named(tmp_path):
    sd = hed.ControlNetHED().state_dict()
    sd["block1.convs.0.weights"] = sd.pop("block1.convs.0.weight")
    sd["block5.projection.bias"] = torch.zeros(2)
    torch.save(sd, tmp_path / "ControlNetHED.pth")
    with pytest.raises(WeightsError) as err:
        hed.hed(rgb(32, 32), weights_dir=tmp_path)
    msg = str(err.value)
    assert "missing keys (1): block1.convs.0.weight" in msg
    assert "unexpected keys (1): block1.convs.0.weights" in msg
    assert "block5.projection.bias: file (2,) vs model (1,)" in msg


def test_batchnorm_counters_are_optional():
    model = mlsd.MLSDLarge()
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    with torch.device("meta"):
        fresh = mlsd.MLSDLarge()
    load_into(fresh, sd)
    assert all(not t.is_meta for t in fresh.state_dict().values())


# ---- depth and seg through transformers (tiny random models saved to a folder) --------------------


@pytest.fixture(scope="module")
def depth_dirs(tmp_path_factory) -> dict[str, Path]:
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("depth_models")
    dpt = tr.DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=64,
        patch_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_in_index=-1,
    )
    tr.DPTForDepthEstimation(dpt).save_pretrained(root / "dpt")
    (root / "dpt" / "preprocessor_config.json").write_text(
        json.dumps({"size": {"height": 64, "width": 64}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    )
    backbone = tr.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=37,
        patch_size=14,
        image_size=56,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    da = tr.DepthAnythingConfig(
        backbone_config=backbone,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        reassemble_hidden_size=32,
    )
    tr.DepthAnythingForDepthEstimation(da).save_pretrained(root / "depth_anything")
    (root / "depth_anything" / "preprocessor_config.json").write_text(
        json.dumps({"size": {"height": 70, "width": 70}, "keep_aspect_ratio": True, "ensure_multiple_of": 14})
    )
    return {"dpt": root / "dpt", "depth_anything": root / "depth_anything"}


@pytest.mark.parametrize("kind", ["dpt", "depth_anything"])
def test_depth_sizes_and_normalisation(kind, depth_dirs):
    out = run_annotator("depth", rgb(97, 131), model_dir=depth_dirs[kind])
    assert out.shape == (97, 131, 3) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255  # d -= min; d /= max
    assert np.array_equal(out[..., 0], out[..., 1])
    assert run_annotator("depth", rgb(45, 67)[..., 0], model_dir=depth_dirs[kind]).shape == (45, 67, 3)
    rgba = np.dstack([rgb(45, 67), np.full((45, 67), 128, np.uint8)])
    assert run_annotator("depth", rgba, model_dir=depth_dirs[kind]).shape == (45, 67, 3)


def test_depth_input_size_rules(depth_dirs):
    from transformers import AutoConfig

    from ctrlnet.annotators.depth import _target_size, read_preprocessor

    dpt, da = depth_dirs["dpt"], depth_dirs["depth_anything"]
    # transformers' ViT DPT needs a square token grid: the image is squashed to the configured square.
    assert _target_size(97, 131, read_preprocessor(dpt), AutoConfig.from_pretrained(dpt), None) == (64, 64)
    assert _target_size(97, 131, {}, AutoConfig.from_pretrained(dpt), None) == (384, 384)
    # Depth Anything keeps the aspect ratio, sides multiples of 14, fitting the side that changes least.
    assert _target_size(97, 131, read_preprocessor(da), AutoConfig.from_pretrained(da), None) == (70, 98)


def test_depth_model_folder_from_env_and_errors(depth_dirs, monkeypatch, tmp_path):
    from ctrlnet.annotators.depth import ENV_MODEL

    monkeypatch.delenv(ENV_MODEL, raising=False)
    with pytest.raises(MissingWeightsError, match=r"model_dir=.*\$CTRLNET_DEPTH_MODEL"):
        run_annotator("depth", rgb(32, 32))
    with pytest.raises(MissingWeightsError, match=r"no config\.json"):
        run_annotator("depth", rgb(32, 32), model_dir=tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match=r"has no weights"):
        run_annotator("depth", rgb(32, 32), model_dir=tmp_path)
    monkeypatch.setenv(ENV_MODEL, str(depth_dirs["dpt"]))
    assert run_annotator("depth", rgb(32, 40)).shape == (32, 40, 3)


@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory) -> Path:
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("seg_model")
    cfg = tr.SegformerConfig(
        num_labels=150,
        hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 1, 1, 1],
        depths=[1, 1, 1, 1],
        decoder_hidden_size=16,
    )
    tr.SegformerForSemanticSegmentation(cfg).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 128, "width": 128}}))
    return folder


def test_ade20k_palette_is_the_original():
    from ctrlnet.annotators.seg import ADE20K_PALETTE

    assert ADE20K_PALETTE.shape == (150, 3)
    # sha256 of json.dumps(mmseg ADE20KDataset.PALETTE), computed from the original annotator source.
    digest = hashlib.sha256(json.dumps(ADE20K_PALETTE.tolist()).encode()).hexdigest()
    assert digest == "5ab25d7f9334ae4735301e2f135a7f9d079e399d5bc961957b6d02c9128c6527"
    assert ADE20K_PALETTE[0].tolist() == [120, 120, 120] and ADE20K_PALETTE[2].tolist() == [6, 230, 230]


def test_seg_paints_palette_colours(seg_dir, monkeypatch):
    from ctrlnet.annotators.seg import ADE20K_PALETTE, ENV_MODEL

    out = run_annotator("seg", rgb(97, 131), model_dir=seg_dir)
    assert out.shape == (97, 131, 3) and out.dtype == np.uint8
    palette = {tuple(c) for c in ADE20K_PALETTE.tolist()}
    assert {tuple(c) for c in np.unique(out.reshape(-1, 3), axis=0).tolist()} <= palette
    assert run_annotator("seg", rgb(45, 67)[..., 0], model_dir=seg_dir).shape == (45, 67, 3)
    monkeypatch.setenv(ENV_MODEL, str(seg_dir))
    rgba = np.dstack([rgb(45, 67), np.zeros((45, 67), np.uint8)])
    assert run_annotator("seg", rgba).shape == (45, 67, 3)


def test_seg_mask_classification_scores():
    from types import SimpleNamespace

    from ctrlnet.annotators.seg import _class_scores

    cls = torch.full((1, 2, 151), -20.0)
    cls[0, 0, 5], cls[0, 1, 7] = 20.0, 20.0  # query 0 -> class 5, query 1 -> class 7
    masks = torch.full((1, 2, 4, 4), -20.0)
    masks[0, 0, :, :2], masks[0, 1, :, 2:] = 20.0, 20.0  # left half, right half
    labels = _class_scores(SimpleNamespace(class_queries_logits=cls, masks_queries_logits=masks), 8, 8)[
        0
    ].argmax(0)
    assert (labels[:, :4] == 5).all() and (labels[:, 4:] == 7).all()


def test_seg_rejects_non_ade_models(tmp_path):
    tr = pytest.importorskip("transformers")
    cfg = tr.SegformerConfig(
        num_labels=19,
        hidden_sizes=[8, 8, 8, 8],
        num_attention_heads=[1, 1, 1, 1],
        depths=[1, 1, 1, 1],
        decoder_hidden_size=8,
    )
    tr.SegformerForSemanticSegmentation(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="19 classes"):
        run_annotator("seg", rgb(32, 32), model_dir=tmp_path)
