"""Images as users send them: EXIF orientation, float and 16-bit samples, transparency; read by the
one loader (load_image) whether they come through the CLI, the HTTP API or the web UI."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ctrlnet.image import HWC3, ImageError, load_image
from ctrlnet.generation.preprocess import annotate
from ctrlnet.pipeline import ControlSpec


def _marked(h=40, w=64):
    """An image whose orientation is visible: a red block top-left, a green one bottom-right."""
    img = np.full((h, w, 3), 90, np.uint8)
    img[:10, :16] = (255, 0, 0)
    img[-10:, -16:] = (0, 255, 0)
    return img


def _with_orientation(img, fmt, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    img = _marked()
    # 6: the camera was turned; the picture is shown rotated 90 degrees clockwise
    jpeg = tmp_path / "phone.jpg"
    jpeg.write_bytes(_with_orientation(img, "JPEG", 6))
    got = load_image(jpeg).astype(int)
    want = np.rot90(img, k=-1).astype(int)
    assert got.shape == (64, 40, 3)
    assert np.abs(got - want).mean() < 3  # JPEG; measured 1.36 levels
    assert got[:10, -10:, 0].mean() > 200  # the red block is now top-right
    # 3: upside down; PNG (eXIf chunk), lossless, from bytes as the API receives it
    png = _with_orientation(img, "PNG", 3)
    assert np.array_equal(load_image(png), np.rot90(img, k=2))
    # 1 and no EXIF: as stored
    assert np.array_equal(load_image(_with_orientation(img, "PNG", 1)), img)


def _encode(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_float_and_16_bit_images_are_scaled_by_their_type():
    ramp = np.linspace(0.0, 1.0, 64 * 48, dtype=np.float32).reshape(48, 64)
    tiff = _encode(ramp, "TIFF")
    assert Image.open(io.BytesIO(tiff)).mode == "F"
    got = load_image(tiff)
    assert got.shape == (48, 64, 3) and np.array_equal(got[:, :, 0], np.round(ramp * 255).astype(np.uint8))
    assert got.max() == 255 and got.min() == 0  # not an all-black map
    over = ramp * 3 - 1  # out of [0, 1]: clipped
    assert np.array_equal(load_image(_encode(over, "TIFF"))[:, :, 1], np.round(np.clip(over, 0, 1) * 255))
    nan = ramp.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ImageError, match="NaN"):
        load_image(_encode(nan, "TIFF"))

    deep = (np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    png16 = _encode(deep, "PNG")
    assert Image.open(io.BytesIO(png16)).mode == "I;16"
    assert np.array_equal(load_image(png16)[:, :, 2], np.round(deep / 257.0).astype(np.uint8))
    dark = (np.arange(64 * 48).reshape(48, 64) % 256).astype(np.uint16)  # a dark 16-bit picture stays dark
    assert load_image(_encode(dark, "PNG")).max() == 1
    assert np.array_equal(load_image(_encode(deep, "TIFF"))[:, :, 0], np.round(deep / 257.0))
    pgm = _encode(deep, "PPM")  # Pillow opens 16-bit PGM as mode "I"
    assert Image.open(io.BytesIO(pgm)).mode == "I"
    assert np.array_equal(load_image(pgm)[:, :, 0], np.round(deep / 257.0))
    wide = (np.arange(64 * 48).reshape(48, 64) * 699_050).astype(np.int32)  # 32-bit TIFF: signed range
    tif32 = _encode(wide, "TIFF")
    assert Image.open(io.BytesIO(tif32)).mode == "I"
    assert np.array_equal(load_image(tif32)[:, :, 0], np.round(wide / (2**31 - 1) * 255))


def _strokes_on_transparent(under=255):
    """White strokes, alpha 255, on fully transparent pixels whose colour is ``under``."""
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = under
    rgba[20:24, 8:56] = (255, 255, 255, 255)
    rgba[8:56, 30:34] = (255, 255, 255, 255)
    return rgba


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_ready_map_with_transparency_stays_white_on_black(tmp_path, mode):
    rgba = _strokes_on_transparent()
    im = Image.fromarray(rgba)
    if mode == "LA":
        im = im.convert("LA")
    elif mode == "P":  # palette with a transparent index
        rgb = _strokes_on_transparent(under=0)[..., :3]  # black = the transparent palette entry
        im = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
        im.info["transparency"] = int(np.asarray(im)[0, 0])
    path = tmp_path / f"map_{mode}.png"
    im.save(path, transparency=im.info.get("transparency")) if mode == "P" else im.save(path)
    got = load_image(path, keep_alpha=True)
    assert got.shape == (64, 64, 4)
    strokes = rgba[..., 3] == 255
    cmap = annotate(ControlSpec(), got, (64, 64), 64)  # annotator none: a ready map
    assert cmap[strokes].min() == 255 and cmap[~strokes].max() == 0
    # the same picture as an annotator's input is put on white (the original apps' HWC3)
    assert HWC3(got)[~strokes].min() == 255
    assert load_image(path).shape == (64, 64, 3) and load_image(path)[~strokes].min() == 255


def test_hwc3_background():
    rgba = _strokes_on_transparent(under=0)
    rgba[0, 0] = (200, 100, 50, 128)  # half transparent
    assert HWC3(rgba, background=0)[0, 0].tolist() == [100, 50, 25]
    assert HWC3(rgba)[0, 0].tolist() == [227, 177, 152]


def test_interfaces_read_control_images_with_the_loader(tmp_path):
    """CLI and API control images keep their alpha for the pipeline and are turned upright."""
    from ctrlnet.interfaces.api.codec import decode_image as _image_from_bytes
    from ctrlnet.interfaces.limits import Limits

    rgba = _strokes_on_transparent()
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    got = _image_from_bytes(buf.getvalue(), "controls[0].image", Limits(), keep_alpha=True)
    assert np.array_equal(got, rgba)
    upright = _image_from_bytes(_with_orientation(_marked(), "PNG", 3), "image", Limits())
    assert np.array_equal(upright, np.rot90(_marked(), k=2))

    from ctrlnet.interfaces.cli import _read_inputs, _request_from_args, build_parser
    from ctrlnet.pipeline import load_models

    path = tmp_path / "strokes.png"
    path.write_bytes(buf.getvalue())
    models = load_models("random:tiny-sd1", ["random:a"], device="cpu", dtype="fp32")
    args = build_parser().parse_args(["generate", "--base", "random:tiny-sd1", "--control", str(path)])
    req = _request_from_args(args, models, _read_inputs(args))
    assert req.controls[0].image.shape == (64, 64, 4)
    cmap = annotate(req.controls[0], req.controls[0].image, (64, 64), 64)
    assert cmap[rgba[..., 3] == 0].max() == 0


def test_web_ui_reads_uploads_with_the_loader(tmp_path):
    pytest.importorskip("gradio")
    from ctrlnet.interfaces.webui.messages import read_upload

    path = tmp_path / "up.png"
    path.write_bytes(_with_orientation(_marked(), "PNG", 3))
    assert np.array_equal(read_upload(str(path), "image"), np.rot90(_marked(), k=2))
    arr = np.zeros((8, 8, 3), np.uint8)
    assert read_upload(arr, "image") is arr and read_upload(None, "image") is None
    (tmp_path / "bad.png").write_text("nope")
    import gradio as gr

    with pytest.raises(gr.Error, match="not a usable image"):
        read_upload(str(tmp_path / "bad.png"), "image")
