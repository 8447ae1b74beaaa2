"""Derive the key -> shape lists of the official annotator weight files (writes annotator_keys.json).

We cannot download the files, so each list is reconstructed by reading the original model code
(lllyasviel/ControlNet-v1-1-nightly, annotator/*) and writing down, layer by layer, which parameters
and buffers PyTorch's ``state_dict`` would hold, in registration order. Nothing here imports torch,
ctrlnet, or the original code: it is plain arithmetic over the layer tables transcribed below, so the
test that compares our modules with this file checks two independent readings of the architecture.

PyTorch conventions used: ``Conv2d`` -> ``weight (out, in/groups, k, k)`` and ``bias (out,)`` unless
``bias=False``; ``ConvTranspose2d`` -> ``weight (in, out, k, k)``; ``BatchNorm2d`` -> ``weight, bias,
running_mean, running_var (C,)`` and ``num_batches_tracked ()``; ``InstanceNorm2d`` with the default
``affine=False, track_running_stats=False`` and ReLU/pool/pad layers hold nothing. Sequential children
are numbered by position, including parameter-free layers.

As a cross-check, the parameter counts agree with the published file sizes on the hub (fp32 unless
noted): HED 14.7 M params (29.4 MB: stored in fp16), PiDiNet 0.71 M (2.9 MB), M-LSD 1.55 M (6.3 MB),
body 52.3 M (209 MB), hand 36.8 M (147 MB), sk_model 4.29 M (17.2 MB), netG 54.4 M (218 MB).

Run ``python tests/data/derive_annotator_keys.py`` to regenerate the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path


def conv(p, cin, cout, k, bias=True, groups=1):
    out = [(f"{p}.weight", [cout, cin // groups, k, k])]
    return out + ([(f"{p}.bias", [cout])] if bias else [])


def deconv(p, cin, cout, k, bias=True):
    return [(f"{p}.weight", [cin, cout, k, k])] + ([(f"{p}.bias", [cout])] if bias else [])


def bn(p, c):
    return [(f"{p}.{n}", [c]) for n in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{p}.num_batches_tracked", [])
    ]


# ---- HED (annotator/hed/__init__.py: ControlNetHED_Apache2) --------------------------------------
# norm: Parameter zeros(1, 3, 1, 1); DoubleConvBlock(in, out, n): convs = Sequential of n 3x3 convs
# (in->out, then out->out), projection = 1x1 conv out->1.
def hed():
    keys = [("norm", [1, 3, 1, 1])]
    for b, (cin, cout, n) in enumerate(
        [(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)], 1
    ):
        for i in range(n):
            keys += conv(f"block{b}.convs.{i}", cin if i == 0 else cout, cout, 3)
        keys += conv(f"block{b}.projection", cout, 1, 1)
    return keys


# ---- PiDiNet (annotator/pidinet/model.py: pidinet() = PiDiNet(60, carv4, dil=24, sa=True)) -------
# Not converted: every pixel-difference conv keeps a 3x3 weight. init_block: custom Conv2d(3, 60, 3),
# bias=False. PDCBlock(in, out, stride): [shortcut 1x1 conv in->out with bias, if stride 2],
# conv1 = depthwise PDC 3x3 (in, 1, 3, 3) no bias, conv2 = 1x1 in->out no bias. Module order after the
# blocks: conv_reduces (assigned first), attentions, dilations, classifier.
def pidinet():
    C = 60
    keys = conv("init_block", 3, C, 3, bias=False)
    plan = [
        ("block1_1", C, C, 1),
        ("block1_2", C, C, 1),
        ("block1_3", C, C, 1),
        ("block2_1", C, 2 * C, 2),
        ("block2_2", 2 * C, 2 * C, 1),
        ("block2_3", 2 * C, 2 * C, 1),
        ("block2_4", 2 * C, 2 * C, 1),
        ("block3_1", 2 * C, 4 * C, 2),
        ("block3_2", 4 * C, 4 * C, 1),
        ("block3_3", 4 * C, 4 * C, 1),
        ("block3_4", 4 * C, 4 * C, 1),
        ("block4_1", 4 * C, 4 * C, 2),
        ("block4_2", 4 * C, 4 * C, 1),
        ("block4_3", 4 * C, 4 * C, 1),
        ("block4_4", 4 * C, 4 * C, 1),
    ]
    for name, cin, cout, stride in plan:
        if stride > 1:
            keys += conv(f"{name}.shortcut", cin, cout, 1)
        keys += conv(f"{name}.conv1", cin, cin, 3, bias=False, groups=cin)
        keys += conv(f"{name}.conv2", cin, cout, 1, bias=False)
    dil, fuse = 24, [C, 2 * C, 4 * C, 4 * C]
    for i in range(4):  # MapReduce(24): conv 1x1 24->1 with bias
        keys += conv(f"conv_reduces.{i}.conv", dil, 1, 1)
    for i in range(4):  # CSAM(24): conv1 1x1 24->4 (bias), conv2 3x3 4->1 no bias
        keys += conv(f"attentions.{i}.conv1", dil, 4, 1) + conv(f"attentions.{i}.conv2", 4, 1, 3, bias=False)
    for i in range(4):  # CDCM(fuse[i], 24): conv1 1x1 (bias), conv2_1..4 3x3 dilated, no bias
        keys += conv(f"dilations.{i}.conv1", fuse[i], dil, 1)
        for j in range(1, 5):
            keys += conv(f"dilations.{i}.conv2_{j}", dil, dil, 3, bias=False)
    keys += conv("classifier", 4, 1, 1)
    return [("module." + k, s) for k, s in keys]  # saved from DataParallel


# ---- M-LSD large (annotator/mlsd/models/mbv2_mlsd_large.py) --------------------------------------
# features.0 = ConvBNReLU(4, 32, stride 2) = [Conv(bias=False), BN, ReLU6] (+ a MaxPool attribute, no
# params). InvertedResidual(inp, oup, s, t): conv = Sequential([ConvBNReLU 1x1 inp->hidden if t != 1],
# ConvBNReLU 3x3 depthwise hidden, Conv 1x1 hidden->oup no bias, BN(oup)); hidden = inp * t.
# Settings (t, c, n, s): (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1).
def mlsd():
    keys = conv("backbone.features.0.0", 4, 32, 3, bias=False) + bn("backbone.features.0.1", 32)
    idx, cin = 1, 32
    for t, c, n, _ in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]:
        for _ in range(n):
            p, hidden, j = f"backbone.features.{idx}.conv", cin * t, 0
            if t != 1:
                keys += conv(f"{p}.0.0", cin, hidden, 1, bias=False) + bn(f"{p}.0.1", hidden)
                j = 1
            keys += conv(f"{p}.{j}.0", hidden, hidden, 3, bias=False, groups=hidden) + bn(
                f"{p}.{j}.1", hidden
            )
            keys += conv(f"{p}.{j + 1}", hidden, c, 1, bias=False) + bn(f"{p}.{j + 2}", c)
            idx, cin = idx + 1, c

    def block_a(p, in_c1, in_c2, out_c1, out_c2):  # conv1: in_c2 -> out_c2, conv2: in_c1 -> out_c1
        return (
            conv(f"{p}.conv1.0", in_c2, out_c2, 1)
            + bn(f"{p}.conv1.1", out_c2)
            + conv(f"{p}.conv2.0", in_c1, out_c1, 1)
            + bn(f"{p}.conv2.1", out_c1)
        )

    def block_b(p, c, o):
        return (
            conv(f"{p}.conv1.0", c, c, 3)
            + bn(f"{p}.conv1.1", c)
            + conv(f"{p}.conv2.0", c, o, 3)
            + bn(f"{p}.conv2.1", o)
        )

    keys += block_a("block15", 64, 96, 64, 64) + block_b("block16", 128, 64)
    keys += block_a("block17", 32, 64, 64, 64) + block_b("block18", 128, 64)
    keys += block_a("block19", 24, 64, 64, 64) + block_b("block20", 128, 64)
    keys += block_a("block21", 16, 64, 64, 64) + block_b("block22", 128, 64)
    keys += conv("block23.conv1.0", 64, 64, 3) + bn("block23.conv1.1", 64)
    keys += conv("block23.conv2.0", 64, 64, 3) + bn("block23.conv2.1", 64) + conv("block23.conv3", 64, 16, 1)
    return keys


# ---- OpenPose (annotator/openpose/model.py) ------------------------------------------------------
# The files hold the Caffe layer names only: util.transfer() maps model key "model0.conv1_1.weight"
# to file key "conv1_1.weight" (drops the first component). Each entry [in, out, k, stride, pad].
VGG_BODY = [
    ("conv1_1", 3, 64, 3),
    ("conv1_2", 64, 64, 3),
    ("conv2_1", 64, 128, 3),
    ("conv2_2", 128, 128, 3),
    ("conv3_1", 128, 256, 3),
    ("conv3_2", 256, 256, 3),
    ("conv3_3", 256, 256, 3),
    ("conv3_4", 256, 256, 3),
    ("conv4_1", 256, 512, 3),
    ("conv4_2", 512, 512, 3),
    ("conv4_3_CPM", 512, 256, 3),
    ("conv4_4_CPM", 256, 128, 3),
]


def body():
    keys = []
    for name, cin, cout, k in VGG_BODY:
        keys += conv(name, cin, cout, k)
    for br, cout in (("L1", 38), ("L2", 19)):
        for name, cin, co, k in [
            (f"conv5_1_CPM_{br}", 128, 128, 3),
            (f"conv5_2_CPM_{br}", 128, 128, 3),
            (f"conv5_3_CPM_{br}", 128, 128, 3),
            (f"conv5_4_CPM_{br}", 128, 512, 1),
            (f"conv5_5_CPM_{br}", 512, cout, 1),
        ]:
            keys += conv(name, cin, co, k)
    for s in range(2, 7):
        for br, cout in (("L1", 38), ("L2", 19)):
            for i in range(1, 6):
                keys += conv(f"Mconv{i}_stage{s}_{br}", 185 if i == 1 else 128, 128, 7)
            keys += conv(f"Mconv6_stage{s}_{br}", 128, 128, 1) + conv(f"Mconv7_stage{s}_{br}", 128, cout, 1)
    return keys


def hand():
    table = VGG_BODY[:10] + [
        ("conv4_3", 512, 512, 3),
        ("conv4_4", 512, 512, 3),
        ("conv5_1", 512, 512, 3),
        ("conv5_2", 512, 512, 3),
        ("conv5_3_CPM", 512, 128, 3),
        ("conv6_1_CPM", 128, 512, 1),
        ("conv6_2_CPM", 512, 22, 1),
    ]
    keys = []
    for name, cin, cout, k in table:
        keys += conv(name, cin, cout, k)
    for s in range(2, 7):
        for i in range(1, 6):
            keys += conv(f"Mconv{i}_stage{s}", 150 if i == 1 else 128, 128, 7)
        keys += conv(f"Mconv6_stage{s}", 128, 128, 1) + conv(f"Mconv7_stage{s}", 128, 22, 1)
    return keys


# ---- Lineart (annotator/lineart/__init__.py: Generator(3, 1, 3)) ---------------------------------
# model0 = [ReflectionPad, Conv 3->64 7x7, IN, ReLU]; model1 = [Conv 64->128 s2, IN, ReLU, Conv
# 128->256 s2, IN, ReLU]; model2 = 3 x ResidualBlock(256) with conv_block = [Pad, Conv, IN, ReLU, Pad,
# Conv, IN]; model3 = [ConvT 256->128, IN, ReLU, ConvT 128->64, IN, ReLU]; model4 = [Pad, Conv 64->1 7x7,
# Sigmoid]. InstanceNorm2d defaults: no parameters.
def lineart():
    keys = conv("model0.1", 3, 64, 7) + conv("model1.0", 64, 128, 3) + conv("model1.3", 128, 256, 3)
    for i in range(3):
        keys += conv(f"model2.{i}.conv_block.1", 256, 256, 3) + conv(f"model2.{i}.conv_block.5", 256, 256, 3)
    keys += deconv("model3.0", 256, 128, 3) + deconv("model3.3", 128, 64, 3) + conv("model4.1", 64, 1, 7)
    return keys


# ---- Anime2Sketch (annotator/lineart_anime/__init__.py: UnetGenerator(3, 1, 8, 64), IN norm) -----
# Norm is InstanceNorm2d (partial) so use_bias=True everywhere. Outermost block: model = [downconv
# 3->64, sub, ReLU, upconv 128->1, Tanh]; middle: [LeakyReLU, downconv, IN, sub, ReLU, upconv, IN];
# innermost: [LeakyReLU, downconv, ReLU, upconv (inner->outer), IN]. All convs 4x4.
# Levels from the outside: (outer, inner) = (1|in 3, 64), (64, 128), (128, 256), (256, 512),
# then 3 x (512, 512), then the innermost (512, 512).
def lineart_anime():
    keys = conv("model.model.0", 3, 64, 4) + deconv("model.model.3", 128, 1, 4)
    prefix = "model.model.1"
    for outer, inner in [(64, 128), (128, 256), (256, 512), (512, 512), (512, 512), (512, 512)]:
        keys += conv(f"{prefix}.model.1", outer, inner, 4) + deconv(f"{prefix}.model.5", inner * 2, outer, 4)
        prefix += ".model.3"
    keys += conv(f"{prefix}.model.1", 512, 512, 4) + deconv(f"{prefix}.model.3", 512, 512, 4)
    return keys


FILES = {
    "ControlNetHED.pth": ("annotator/hed/__init__.py ControlNetHED_Apache2", None, hed),
    "table5_pidinet.pth": ("annotator/pidinet/model.py pidinet()", "state_dict", pidinet),
    "mlsd_large_512_fp32.pth": ("annotator/mlsd/models/mbv2_mlsd_large.py MobileV2_MLSD_Large", None, mlsd),
    "body_pose_model.pth": ("annotator/openpose/model.py bodypose_model (+ util.transfer)", None, body),
    "hand_pose_model.pth": ("annotator/openpose/model.py handpose_model (+ util.transfer)", None, hand),
    "sk_model.pth": ("annotator/lineart/__init__.py Generator(3, 1, 3)", None, lineart),
    "sk_model2.pth": ("annotator/lineart/__init__.py Generator(3, 1, 3)", None, lineart),
    # The original loader strips "module." from netG.pth keys when present; listed here without it.
    "netG.pth": ("annotator/lineart_anime/__init__.py UnetGenerator(3, 1, 8, 64)", None, lineart_anime),
}


def derive() -> dict:
    files = {}
    for name, (source, container, fn) in FILES.items():
        keys = fn()
        assert len({k for k, _ in keys}) == len(keys), f"duplicate key in {name}"
        files[name] = {
            "source": "lllyasviel/ControlNet-v1-1-nightly " + source,
            "container": container,
            "keys": [[k, s] for k, s in keys],
        }
    return {
        "about": "Official state_dict keys and shapes of the lllyasviel/Annotators files, derived by reading "
        "the original model code; see derive_annotator_keys.py for the derivation. 'container': key the "
        "state dict is stored under, if any. Keys ending in num_batches_tracked may be absent from files "
        "written by old PyTorch versions.",
        "files": files,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("annotator_keys.json")
    data = derive()
    # One key per line keeps the file readable and its diffs small.
    parts = ["{", f' "about": {json.dumps(data["about"])},', ' "files": {']
    names = list(data["files"])
    for n, name in enumerate(names):
        entry = data["files"][name]
        parts.append(f"  {json.dumps(name)}: {{")
        parts.append(f'   "source": {json.dumps(entry["source"])},')
        parts.append(f'   "container": {json.dumps(entry["container"])},')
        parts.append('   "keys": [')
        rows = [f"    {json.dumps(k)}" for k in entry["keys"]]
        parts.append(",\n".join(rows))
        parts.append("   ]")
        parts.append("  }" + ("," if n < len(names) - 1 else ""))
    parts += [" }", "}"]
    text = "\n".join(parts)
    assert json.loads(text) == data
    out.write_text(text + "\n")
    print(f"wrote {out}: " + ", ".join(f"{k} ({len(v['keys'])} keys)" for k, v in data["files"].items()))
