"""Monocular depth (MiDaS DPT-hybrid, DPT-large, Depth Anything) through ``transformers``.

The model is a local folder (``config.json`` + weights, e.g. a download of ``Intel/dpt-hybrid-midas``)
passed as ``model_dir`` or via ``$CTRLNET_DEPTH_MODEL``; nothing is downloaded. The relative inverse
depth is normalised as the original MiDaS annotator does: ``d -= d.min(); d /= d.max()`` -> uint8,
so near is bright.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ctrlnet.annotators.weights import MissingWeightsError, cached, file_key, resolve_dtype
from ctrlnet.image import HWC3

ENV_MODEL = "CTRLNET_DEPTH_MODEL"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def model_folder(model_dir, env: str, what: str, example: str) -> Path:
    """Resolve and check a local ``transformers`` model folder; a clear MissingWeightsError otherwise."""
    source = model_dir if model_dir is not None else os.environ.get(env)
    if not source:
        raise MissingWeightsError(
            f"the {what} annotator needs a local transformers model folder: pass model_dir=<folder> or set "
            f"${env} (for example: huggingface-cli download {example} --local-dir <folder>)"
        )
    folder = Path(source).expanduser()
    if not (folder / "config.json").is_file():
        raise MissingWeightsError(
            f"{what} model folder {folder} has no config.json (is it a transformers model folder?)"
        )
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise MissingWeightsError(
            f"{what} model folder {folder} has no weights (expected one of {', '.join(WEIGHT_FILES)})"
        )
    return folder


def read_preprocessor(folder: Path) -> dict:
    p = folder / "preprocessor_config.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def load_hf_model(folder: Path, auto_classes, device, dtype):
    """``from_pretrained`` (local files only) with the first auto class that accepts the config; cached."""
    dtype = resolve_dtype(dtype)
    weights = next(folder / f for f in WEIGHT_FILES if (folder / f).is_file())
    key = ("hf", file_key(folder / "config.json"), file_key(weights), str(torch.device(device)), dtype)

    def factory():
        errors = []
        for cls in auto_classes:
            try:
                model = cls.from_pretrained(str(folder), local_files_only=True)
            except ValueError as e:  # config type not served by this auto class
                errors.append(f"{cls.__name__}: {str(e).splitlines()[0]}")
                continue
            return model.to(device=torch.device(device), dtype=dtype).eval().requires_grad_(False)
        raise ValueError(f"cannot load {folder}: " + "; ".join(errors))

    return cached(key, factory)


def _multiple(val: float, m: int) -> int:
    return max(m, int(round(val / m)) * m)


def _target_size(h: int, w: int, cfg: dict, model_cfg, size: int | None) -> tuple[int, int]:
    """Network input size following the folder's preprocessor_config (DPTImageProcessor's rule)."""
    is_dpt = model_cfg.model_type == "dpt"
    s = cfg.get("size") or {}
    th, tw = s.get("height", s.get("shortest_edge")), s.get("width", s.get("shortest_edge"))
    if th is None or tw is None:
        th = tw = 384 if is_dpt else 518
    if size is not None:
        th = tw = int(size)
    keep = cfg.get("keep_aspect_ratio", not is_dpt)
    multiple = int(cfg.get("ensure_multiple_of", 1 if is_dpt else 14))
    if is_dpt:  # the ViT patch grid and the 4 fusion levels need sides divisible by 32
        multiple = math.lcm(multiple, 32)
    # transformers' ViT DPT (plain or hybrid) only reshapes square token grids.
    if is_dpt and (
        getattr(model_cfg, "backbone_config", None) is None or getattr(model_cfg, "is_hybrid", False)
    ):
        keep = False
        th = tw = max(th, tw)
    sh, sw = th / h, tw / w
    if keep:  # scale as little as possible
        if abs(1 - sw) < abs(1 - sh):
            sh = sw
        else:
            sw = sh
    return _multiple(sh * h, multiple), _multiple(sw * w, multiple)


@torch.no_grad()
def depth(
    image: np.ndarray, *, model_dir=None, size: int | None = None, device="cpu", dtype=torch.float32
) -> np.ndarray:
    """Depth map (H, W, 3) uint8, near = white, from a local DPT / Depth Anything folder."""
    from transformers import AutoModelForDepthEstimation

    image = HWC3(image)
    H, W = image.shape[:2]
    folder = model_folder(model_dir, ENV_MODEL, "depth", "Intel/dpt-hybrid-midas")
    model = load_hf_model(folder, [AutoModelForDepthEstimation], device, dtype)
    cfg = read_preprocessor(folder)
    is_dpt = model.config.model_type == "dpt"
    mean = cfg.get("image_mean", [0.5] * 3 if is_dpt else IMAGENET_MEAN)  # MiDaS DPT: x / 127.5 - 1
    std = cfg.get("image_std", [0.5] * 3 if is_dpt else IMAGENET_STD)
    h_in, w_in = _target_size(H, W, cfg, model.config, size)
    x = image.astype(np.float32) / 255.0
    if (h_in, w_in) != (H, W):
        x = cv2.resize(x, (w_in, h_in), interpolation=cv2.INTER_CUBIC)
    x = (x - np.float32(mean)) / np.float32(std)
    p = next(model.parameters())
    pixels = torch.from_numpy(x).permute(2, 0, 1)[None].to(p.device, p.dtype)  # (1, 3, h, w)
    pred = model(pixel_values=pixels).predicted_depth  # (1, h', w')
    pred = F.interpolate(pred[:, None].float(), size=(H, W), mode="bicubic", align_corners=False)[0, 0]
    pred = pred - pred.min()
    top = pred.max()
    if not math.isfinite(float(top)):
        raise ValueError("depth model produced non-finite values")
    pred = pred / top if float(top) > 0 else pred
    return HWC3((pred.cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8))


ANNOTATORS = {"depth": depth}
