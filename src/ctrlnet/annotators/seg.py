"""Semantic segmentation (ADE20K, 150 classes) drawn in the palette the seg ControlNets were trained on.

The model is a local ``transformers`` folder (Segformer, UperNet, BEiT, DPT... via
``AutoModelForSemanticSegmentation``; Mask2Former / OneFormer via the universal-segmentation class)
passed as ``model_dir`` or ``$CTRLNET_SEG_MODEL``. Each pixel's class is painted with
``ADE20K_PALETTE`` at full opacity, as the original UniFormer annotator (mmseg ``show_result``,
opacity 1) does; class 0 is "wall", as in mmseg's reduced-zero labels and the hub ADE20K models.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ctrlnet.annotators.depth import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_hf_model,
    model_folder,
    read_preprocessor,
)
from ctrlnet.image import HWC3

ENV_MODEL = "CTRLNET_SEG_MODEL"
NUM_CLASSES = 150
MULTIPLE = 32

# mmseg ADE20KDataset.PALETTE (RGB), index = class id. Data from the original annotator.
# fmt: off
ADE20K_PALETTE = np.array([
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
], dtype=np.uint8)
# fmt: on


def colorize(labels: np.ndarray) -> np.ndarray:
    """(H, W) class ids in [0, 150) -> (H, W, 3) uint8 RGB."""
    return ADE20K_PALETTE[labels]


def _input_size(h: int, w: int, cfg: dict, size: int | None) -> tuple[int, int]:
    """Short side to ``size`` (default: the folder's, else 512 as mmseg's ADE pipeline), sides to x32."""
    if size is None:
        s = cfg.get("size") or {}
        size = s.get("shortest_edge") or min(s.get("height", 512), s.get("width", 512))
    k = float(size) / min(h, w)
    return max(MULTIPLE, int(round(h * k / MULTIPLE)) * MULTIPLE), max(
        MULTIPLE, int(round(w * k / MULTIPLE)) * MULTIPLE
    )


def _class_scores(out, H: int, W: int) -> torch.Tensor:
    """(1, 150, H, W) class scores from either a per-pixel or a mask-classification head."""
    if getattr(out, "class_queries_logits", None) is not None:  # Mask2Former / OneFormer
        probs = out.class_queries_logits.float().softmax(-1)[..., :-1]  # (1, Q, 150), drop "no object"
        masks = out.masks_queries_logits.float().sigmoid()  # (1, Q, h, w)
        scores = torch.einsum("bqc,bqhw->bchw", probs, masks)
    else:
        scores = out.logits.float()  # (1, 150, h, w)
    return F.interpolate(scores, size=(H, W), mode="bilinear", align_corners=False)


@torch.no_grad()
def seg(
    image: np.ndarray, *, model_dir=None, size: int | None = None, device="cpu", dtype=torch.float32
) -> np.ndarray:
    """ADE20K segmentation map (H, W, 3) uint8 in the ADE20K palette."""
    from transformers import AutoModelForSemanticSegmentation, AutoModelForUniversalSegmentation

    image = HWC3(image)
    H, W = image.shape[:2]
    folder = model_folder(model_dir, ENV_MODEL, "seg", "openmmlab/upernet-convnext-small")
    model = load_hf_model(
        folder, [AutoModelForSemanticSegmentation, AutoModelForUniversalSegmentation], device, dtype
    )
    n = model.config.num_labels
    if n != NUM_CLASSES:
        raise ValueError(
            f"seg model at {folder} has {n} classes; the seg annotator needs an ADE20K model (150)"
        )
    cfg = read_preprocessor(folder)
    mean, std = cfg.get("image_mean", IMAGENET_MEAN), cfg.get("image_std", IMAGENET_STD)
    h_in, w_in = _input_size(H, W, cfg, size)
    x = image.astype(np.float32) / 255.0
    if (h_in, w_in) != (H, W):
        x = cv2.resize(x, (w_in, h_in), interpolation=cv2.INTER_LINEAR)
    x = (x - np.float32(mean)) / np.float32(std)
    p = next(model.parameters())
    out = model(pixel_values=torch.from_numpy(x).permute(2, 0, 1)[None].to(p.device, p.dtype))  # (1, 3, h, w)
    labels = _class_scores(out, H, W)[0].argmax(0).cpu().numpy()  # (H, W)
    return colorize(labels)


ANNOTATORS = {"seg": seg}
