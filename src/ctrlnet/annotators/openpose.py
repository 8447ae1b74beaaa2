"""OpenPose body (and hand) keypoints, drawn the way ControlNet v1.1's openpose model was trained.

Weights: ``body_pose_model.pth`` and ``hand_pose_model.pth`` from lllyasviel/Annotators. They are CMU's
Caffe models converted by pytorch-openpose, keyed by the bare Caffe layer names (``conv1_1.weight``,
``Mconv7_stage6_L1.bias``); our modules register each conv under exactly that name.

Pipeline (as the original): BGR input, resize so 368 px x scale spans the height, pad to a multiple of
8 with grey, run the 6-stage CPM, upsample heat maps and part affinity fields (PAFs) back; peaks are
4-neighbour maxima of the Gaussian-smoothed heat maps; limbs are scored by sampling the PAF along
each candidate pair; people are assembled greedily. Hands are cropped from the arm geometry.
"""

from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np
import torch

from ctrlnet.annotators.openpose_nets import BodyPoseNet, HandPoseNet
from ctrlnet.annotators.weights import find_weights, load_model
from ctrlnet.image import HWC3

BODY_WEIGHTS = "body_pose_model.pth"
HAND_WEIGHTS = "hand_pose_model.pth"

BOXSIZE, STRIDE, PAD_VALUE = 368, 8, 128

# ---- image helpers (the original's resize rules) -------------------------------------------------


def _resize(x: np.ndarray, h: int, w: int, k: float) -> np.ndarray:
    """Area when shrinking, Lanczos when enlarging; maps with many channels go one channel at a time."""
    interp = cv2.INTER_AREA if k < 1 else cv2.INTER_LANCZOS4
    if x.ndim == 2 or x.shape[2] in (1, 3):
        y = cv2.resize(x, (int(w), int(h)), interpolation=interp)
        return y.reshape(y.shape[0], y.shape[1], *x.shape[2:])
    return np.stack(
        [cv2.resize(x[:, :, i], (int(w), int(h)), interpolation=interp) for i in range(x.shape[2])], 2
    )


def resize_to(x: np.ndarray, h: float, w: float) -> np.ndarray:
    ho, wo = x.shape[:2]
    return _resize(x, h, w, (h + w) / (ho + wo))


def resize_by(x: np.ndarray, f: float) -> np.ndarray:
    ho, wo = x.shape[:2]
    return _resize(x, ho * f, wo * f, (ho * f + wo * f) / (ho + wo))


def pad_right_down(
    img: np.ndarray, stride: int = STRIDE, value: int = PAD_VALUE
) -> tuple[np.ndarray, tuple[int, int]]:
    h, w = img.shape[:2]
    ph, pw = -h % stride, -w % stride
    out = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=value)
    return out, (ph, pw)


def gaussian_filter(x: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """Separable Gaussian equal to ``scipy.ndimage.gaussian_filter(x, sigma)`` (reflect, truncate 4)."""
    r = int(4.0 * sigma + 0.5)
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * t * t / (sigma * sigma))
    k /= k.sum()
    return cv2.sepFilter2D(np.asarray(x, np.float64), cv2.CV_64F, k, k, borderType=cv2.BORDER_REFLECT)


def _to_input(img: np.ndarray, device, dtype) -> torch.Tensor:
    return torch.from_numpy(img.astype(np.float32) / 256.0 - 0.5).to(device, dtype).permute(2, 0, 1)[None]


# ---- body ----------------------------------------------------------------------------------------

# Keypoints (1-based in LIMBS): 1 nose, 2 neck, 3-5 right arm, 6-8 left arm, 9-11 right leg,
# 12-14 left leg, 15/16 eyes, 17/18 ears.
# fmt: off
LIMBS = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13],
         [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [3, 17], [6, 18]]
# PAF channel pairs (x, y) for each limb, numbered from 19 as in the Caffe output blob.
PAF_INDEX = [[31, 32], [39, 40], [33, 34], [35, 36], [41, 42], [43, 44], [19, 20], [21, 22], [23, 24],
             [25, 26], [27, 28], [29, 30], [47, 48], [49, 50], [53, 54], [51, 52], [55, 56], [37, 38],
             [45, 46]]
COLORS = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
          [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255],
          [0, 0, 255], [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]
# fmt: on


def body_maps(model: BodyPoseNet, bgr: np.ndarray, scales=(0.5,)) -> tuple[np.ndarray, np.ndarray]:
    """Heat maps (H, W, 19) and PAFs (H, W, 38) averaged over ``scales`` (x 368 px / image height)."""
    H, W = bgr.shape[:2]
    p = next(model.parameters())
    heat_avg = np.zeros((H, W, 19))
    paf_avg = np.zeros((H, W, 38))
    for scale in scales:
        f = scale * BOXSIZE / H
        padded, (ph, pw) = pad_right_down(resize_by(bgr, f))
        paf, heat = model(_to_input(padded, p.device, p.dtype))
        hp, wp = padded.shape[:2]
        maps = []
        for t in (heat, paf):
            m = t[0].float().permute(1, 2, 0).cpu().numpy()  # (hp / 8, wp / 8, C)
            m = resize_by(m, STRIDE)[: hp - ph, : wp - pw]
            maps.append(resize_to(m, H, W))
        # The original accumulates the heat map as ``avg += avg + heat / n``, which only equals the
        # mean for one scale (its default); we take the plain mean.
        heat_avg += maps[0] / len(scales)
        paf_avg += maps[1] / len(scales)
    return heat_avg, paf_avg


def find_peaks(heat: np.ndarray, thre: float = 0.1) -> list[list[tuple]]:
    """Per part (18), the 4-neighbour maxima of the smoothed map above ``thre``: (x, y, score, id)."""
    peaks, counter = [], 0
    for part in range(18):
        raw = heat[:, :, part]
        s = gaussian_filter(raw, sigma=3)
        nb = np.pad(s, 1)  # zero border, as the original's shifted copies
        c = nb[1:-1, 1:-1]
        mask = (
            (c >= nb[:-2, 1:-1])
            & (c >= nb[2:, 1:-1])
            & (c >= nb[1:-1, :-2])
            & (c >= nb[1:-1, 2:])
            & (c > thre)
        )
        ys, xs = np.nonzero(mask)
        peaks.append(
            [(int(x), int(y), float(raw[y, x]), counter + i) for i, (x, y) in enumerate(zip(xs, ys))]
        )
        counter += len(xs)
    return peaks


def connect_limbs(peaks, paf: np.ndarray, height: int, thre: float = 0.05, n_mid: int = 10):
    """For each limb, the accepted (idA, idB, score, i, j) connections, greedily by PAF score."""
    connections, missing = [], []
    for k, ((a, b), (ix, iy)) in enumerate(zip(LIMBS, PAF_INDEX)):
        cand_a, cand_b = peaks[a - 1], peaks[b - 1]
        if not cand_a or not cand_b:
            missing.append(k)
            connections.append(None)
            continue
        A = np.array([c[:2] for c in cand_a], np.float64)  # (nA, 2) x, y
        B = np.array([c[:2] for c in cand_b], np.float64)  # (nB, 2)
        vec = B[None, :, :] - A[:, None, :]  # (nA, nB, 2)
        norm = np.maximum(np.sqrt(vec[..., 0] * vec[..., 0] + vec[..., 1] * vec[..., 1]), 0.001)
        vec = vec / norm[..., None]
        # n_mid samples from A to B (np.linspace broadcasts over all pairs), rounded half-to-even.
        xs = np.rint(np.linspace(A[:, None, 0], B[None, :, 0], n_mid, axis=-1)).astype(int)  # (nA, nB, n_mid)
        ys = np.rint(np.linspace(A[:, None, 1], B[None, :, 1], n_mid, axis=-1)).astype(int)
        dots = (
            paf[ys, xs, ix - 19] * vec[..., None, 0] + paf[ys, xs, iy - 19] * vec[..., None, 1]
        )  # (nA, nB, n_mid)
        total = np.zeros(dots.shape[:2])
        for m in range(n_mid):  # summed in order, as the original
            total = total + dots[..., m]
        score = total / n_mid + np.minimum(0.5 * height / norm - 1, 0)
        ok = ((dots > thre).sum(-1) > 0.8 * n_mid) & (score > 0)
        ii, jj = np.nonzero(ok)  # i-major order, like the original's nested loops
        order = np.argsort(-score[ii, jj], kind="stable")
        conn: list[list[float]] = []
        used_a, used_b = set(), set()
        for o in order:
            i, j = int(ii[o]), int(jj[o])
            if i not in used_a and j not in used_b:
                conn.append([cand_a[i][3], cand_b[j][3], float(score[i, j]), i, j])
                used_a.add(i)
                used_b.add(j)
                if len(conn) >= min(len(cand_a), len(cand_b)):
                    break
        connections.append(np.array(conn, np.float64).reshape(-1, 5))
    return connections, missing


def group_people(peaks, connections, missing) -> tuple[np.ndarray, np.ndarray]:
    """Assemble limbs into people. Returns candidate (N, 4: x, y, score, id) and subset (P, 20):
    per person 18 candidate ids (-1 absent), total score, part count."""
    candidate = np.array([p for part in peaks for p in part], np.float64).reshape(-1, 4)
    subset = -1 * np.ones((0, 20))
    for k in range(len(LIMBS)):
        if k in missing:
            continue
        conn = connections[k]
        a, b = np.array(LIMBS[k]) - 1
        for i in range(len(conn)):
            pa, pb, s = conn[i, 0], conn[i, 1], conn[i, 2]
            # People already holding either end (the original errors past two; we keep the first two).
            found = [j for j in range(len(subset)) if subset[j][a] == pa or subset[j][b] == pb][:2]
            if len(found) == 1:
                j = found[0]
                if subset[j][b] != pb:
                    subset[j][b] = pb
                    subset[j][-1] += 1
                    subset[j][-2] += candidate[int(pb), 2] + s
            elif len(found) == 2:
                j1, j2 = found
                membership = ((subset[j1] >= 0).astype(int) + (subset[j2] >= 0).astype(int))[:-2]
                if not np.any(membership == 2):  # disjoint: merge the two people
                    subset[j1][:-2] += subset[j2][:-2] + 1
                    subset[j1][-2:] += subset[j2][-2:]
                    subset[j1][-2] += s
                    subset = np.delete(subset, j2, 0)
                else:
                    subset[j1][b] = pb
                    subset[j1][-1] += 1
                    subset[j1][-2] += candidate[int(pb), 2] + s
            elif not found and k < 17:
                row = -1 * np.ones(20)
                row[a], row[b] = pa, pb
                row[-1] = 2
                row[-2] = candidate[int(pa), 2] + candidate[int(pb), 2] + s
                subset = np.vstack([subset, row])
    keep = [i for i in range(len(subset)) if not (subset[i][-1] < 4 or subset[i][-2] / subset[i][-1] < 0.4)]
    return candidate, subset[keep]


# ---- hands ---------------------------------------------------------------------------------------


def hand_boxes(candidate: np.ndarray, subset: np.ndarray, H: int, W: int) -> list[tuple[int, int, int, bool]]:
    """Square hand crops (x, y, size, is_left) extrapolated from wrist and elbow (OpenPose's rule)."""
    boxes = []
    for person in subset.astype(int):
        arms = []
        if np.all(person[[5, 6, 7]] != -1):
            arms.append((person[[5, 6, 7]], True))
        if np.all(person[[2, 3, 4]] != -1):
            arms.append((person[[2, 3, 4]], False))
        for (sh, el, wr), is_left in arms:
            x1, y1 = candidate[sh][:2]
            x2, y2 = candidate[el][:2]
            x3, y3 = candidate[wr][:2]
            x = x3 + 0.33 * (x3 - x2)
            y = y3 + 0.33 * (y3 - y2)
            width = 1.5 * max(math.hypot(x3 - x2, y3 - y2), 0.9 * math.hypot(x2 - x1, y2 - y1))
            x, y = max(x - width / 2, 0), max(y - width / 2, 0)
            width = min(width if x + width <= W else W - x, width if y + width <= H else H - y)
            if width >= 20:
                boxes.append((int(x), int(y), int(width), is_left))
    return boxes


def _npmax(a: np.ndarray) -> tuple[int, int]:
    i = int(a.max(1).argmax())
    return i, int(a[i].argmax())


HAND_WSIZE = 128  # hand heat maps are compared on a 128 x 128 grid


def hand_heatmaps(model: HandPoseNet, crop_bgr: np.ndarray, scales=(0.5, 1.0, 1.5, 2.0)) -> np.ndarray:
    """(128, 128, 22) hand heat maps averaged over square inputs of 368 px x ``scales``."""
    p = next(model.parameters())
    avg = np.zeros((HAND_WSIZE, HAND_WSIZE, 22))
    img = cv2.GaussianBlur(crop_bgr, (0, 0), 0.8)
    for scale in scales:
        s = scale * BOXSIZE
        padded, (ph, pw) = pad_right_down(resize_to(img, s, s))
        out = model(_to_input(padded, p.device, p.dtype))[0].float().permute(1, 2, 0).cpu().numpy()
        hp, wp = padded.shape[:2]
        out = resize_by(out, STRIDE)[: hp - ph, : wp - pw]
        avg += resize_to(out, HAND_WSIZE, HAND_WSIZE) / len(scales)
    return avg


def hand_peaks_from_maps(avg: np.ndarray, Hr: int, Wr: int, thre: float = 0.05) -> np.ndarray:
    """21 keypoints (x, y) in crop pixels: the maximum of the strongest blob above ``thre``, else (0, 0)."""
    result = []
    for part in range(21):
        raw = avg[:, :, part].copy()
        binary = (gaussian_filter(raw, sigma=3) > thre).astype(np.uint8)
        if binary.sum() == 0:
            result.append([0, 0])
            continue
        n, labels = cv2.connectedComponents(binary, connectivity=8)
        best = 1 + int(np.argmax([raw[labels == i].sum() for i in range(1, n)]))
        raw[labels != best] = 0
        y, x = _npmax(raw)
        result.append([int(float(x) * float(Wr) / HAND_WSIZE), int(float(y) * float(Hr) / HAND_WSIZE)])
    return np.array(result)


# ---- detection and drawing -----------------------------------------------------------------------


def detect_pose(
    image: np.ndarray,
    *,
    hands: bool = False,
    scales=(0.5,),
    hand_scales=(0.5, 1.0, 1.5, 2.0),
    weights_dir=None,
    device="cpu",
    dtype=torch.float32,
) -> dict:
    """Keypoints as the v1.1 detector returns them: coordinates normalised by W and H.

    ``{"bodies": {"candidate": [[x, y], ...], "subset": [[20 floats], ...]}, "hands": [[[x, y] * 21], ...],
    "faces": []}``; a missing hand point is negative.
    """
    image = HWC3(image)
    H, W = image.shape[:2]
    bgr = np.ascontiguousarray(image[:, :, ::-1])  # the Caffe models take BGR
    body = load_model(BODY_WEIGHTS, BodyPoseNet, weights_dir=weights_dir, device=device, dtype=dtype)
    if hands:
        find_weights(HAND_WEIGHTS, weights_dir)  # fail early; the model itself loads only when needed
    with torch.no_grad():
        heat, paf = body_maps(body, bgr, scales)
        peaks = find_peaks(heat)
        connections, missing = connect_limbs(peaks, paf, H)
        candidate, subset = group_people(peaks, connections, missing)
        found_hands = []
        boxes = hand_boxes(candidate, subset, H, W) if hands else []
        if boxes:
            hand = load_model(HAND_WEIGHTS, HandPoseNet, weights_dir=weights_dir, device=device, dtype=dtype)
            for x, y, w, _ in boxes:
                crop = bgr[y : y + w, x : x + w]
                pk = hand_peaks_from_maps(hand_heatmaps(hand, crop, hand_scales), *crop.shape[:2])
                pk = pk.astype(np.float32)
                pk[:, 0] = np.where(pk[:, 0] < 1e-6, -1, pk[:, 0] + x) / float(W)
                pk[:, 1] = np.where(pk[:, 1] < 1e-6, -1, pk[:, 1] + y) / float(H)
                found_hands.append(pk.tolist())
    cand = candidate[:, :2].copy()
    cand[:, 0] /= float(W)
    cand[:, 1] /= float(H)
    return {
        "bodies": {"candidate": cand.tolist(), "subset": subset.tolist()},
        "hands": found_hands,
        "faces": [],
    }


def draw_bodypose(canvas: np.ndarray, candidate, subset) -> np.ndarray:
    """Limbs as filled ellipses (first 17 limbs), dimmed to 60 %, then keypoint discs on top."""
    H, W = canvas.shape[:2]
    candidate, subset = np.array(candidate, np.float64), np.array(subset, np.float64)
    for i in range(17):
        for person in subset:
            index = person[np.array(LIMBS[i]) - 1]
            if -1 in index:
                continue
            Y = candidate[index.astype(int), 0] * float(W)
            X = candidate[index.astype(int), 1] * float(H)
            mX, mY = np.mean(X), np.mean(Y)
            length = ((X[0] - X[1]) ** 2 + (Y[0] - Y[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(X[0] - X[1], Y[0] - Y[1]))
            polygon = cv2.ellipse2Poly((int(mY), int(mX)), (int(length / 2), 4), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, polygon, COLORS[i])
    canvas = (canvas * 0.6).astype(np.uint8)
    for i in range(18):
        for person in subset:
            index = int(person[i])
            if index == -1:
                continue
            x, y = candidate[index][0:2]
            cv2.circle(canvas, (int(x * W), int(y * H)), 4, COLORS[i], thickness=-1)
    return canvas


# fmt: off
HAND_EDGES = [[0, 1], [1, 2], [2, 3], [3, 4], [0, 5], [5, 6], [6, 7], [7, 8], [0, 9], [9, 10], [10, 11],
              [11, 12], [0, 13], [13, 14], [14, 15], [15, 16], [0, 17], [17, 18], [18, 19], [19, 20]]
# fmt: on
EPS = 0.01


def draw_handpose(canvas: np.ndarray, all_hand_peaks) -> np.ndarray:
    """Hand bones coloured round the hue circle, keypoints as (0, 0, 255) discs."""
    H, W = canvas.shape[:2]
    for peaks in all_hand_peaks:
        peaks = np.array(peaks)
        for ie, (e0, e1) in enumerate(HAND_EDGES):
            x1, y1 = int(peaks[e0][0] * W), int(peaks[e0][1] * H)
            x2, y2 = int(peaks[e1][0] * W), int(peaks[e1][1] * H)
            if x1 > EPS and y1 > EPS and x2 > EPS and y2 > EPS:
                color = [c * 255 for c in colorsys.hsv_to_rgb(ie / float(len(HAND_EDGES)), 1.0, 1.0)]
                cv2.line(canvas, (x1, y1), (x2, y2), color, thickness=2)
        for x, y in peaks:
            x, y = int(x * W), int(y * H)
            if x > EPS and y > EPS:
                cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)
    return canvas


def draw_pose(pose: dict, H: int, W: int, draw_body: bool = True, draw_hand: bool = True) -> np.ndarray:
    """Render a pose dict from :func:`detect_pose` on a black (H, W, 3) canvas."""
    canvas = np.zeros((H, W, 3), np.uint8)
    if draw_body:
        canvas = draw_bodypose(canvas, pose["bodies"]["candidate"], pose["bodies"]["subset"])
    if draw_hand:
        canvas = draw_handpose(canvas, pose["hands"])
    return canvas


def openpose(
    image: np.ndarray, *, scales=(0.5,), weights_dir=None, device="cpu", dtype=torch.float32
) -> np.ndarray:
    """Body skeletons (H, W, 3) uint8 in the OpenPose colours on black."""
    image = HWC3(image)
    pose = detect_pose(image, scales=scales, weights_dir=weights_dir, device=device, dtype=dtype)
    return draw_pose(pose, *image.shape[:2])


def openpose_hand(
    image: np.ndarray,
    *,
    scales=(0.5,),
    hand_scales=(0.5, 1.0, 1.5, 2.0),
    weights_dir=None,
    device="cpu",
    dtype=torch.float32,
) -> np.ndarray:
    """Body skeletons plus hands (needs ``hand_pose_model.pth`` too)."""
    image = HWC3(image)
    pose = detect_pose(
        image,
        hands=True,
        scales=scales,
        hand_scales=hand_scales,
        weights_dir=weights_dir,
        device=device,
        dtype=dtype,
    )
    return draw_pose(pose, *image.shape[:2])


ANNOTATORS = {"openpose": openpose, "openpose_hand": openpose_hand}
