"""The web app in a real headless Chromium (Playwright): every main flow, checked on the pixels.

One app server for the module, on the embedded demo model (a trained tiny SD with the fill50k
ControlNet, so img2img strength and control modes have visible effects) at 64 px and few steps.
Screenshots of each tab go to $CTRLNET_SCREENSHOTS (default /tmp/webui_shots).
"""

import io
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import gradient_photo as _photo

gr = pytest.importorskip("gradio")

SHOTS = Path(os.environ.get("CTRLNET_SCREENSHOTS", "/tmp/webui_shots"))
RUN_TIMEOUT = 180_000  # ms; the machine may be busy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _ensure_browser():
    """(playwright's sync_playwright, chromium path); installs them where possible, else skips with the reason."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "playwright"], capture_output=True, timeout=300)
        if r.returncode:
            pytest.skip(f"playwright is not installed and pip could not install it: {r.stderr.decode()[-300:]}")
    exe = _find_chromium()
    if exe is None and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=600)
        exe = _find_chromium()
    if exe is None:
        pytest.skip("no Chromium browser: install Debian's `chromium` package (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    return sync_playwright, exe


@pytest.fixture(scope="module")
def loaded():
    from ctrlnet.interfaces.model_args import load_named
    from ctrlnet.pipeline import DEMO_BASE, demo_dir

    if not (demo_dir() / DEMO_BASE).is_file():
        pytest.skip("the embedded demo model is not built")
    return load_named(None, {}, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def served(loaded, tmp_path_factory):
    from ctrlnet.colorize.reference import load_colorizer_models
    from ctrlnet.interfaces.webui import build_app, launch

    out = tmp_path_factory.mktemp("ui_out")
    colorizer = load_colorizer_models("random:tiny-sd1", "random", device="cpu", dtype="fp32")
    app = build_app(loaded, outputs_dir=out, defaults={"steps": 4, "resolution": 64}, colorizer=colorizer)
    port = _free_port()
    launch(app, port=port, outputs_dir=out, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}", out
    finally:
        app.close()


@pytest.fixture(scope="module")
def browser():
    sync_playwright, exe = _ensure_browser()
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, served):
    """A fresh page (its own Gradio session) on the app."""
    url, _ = served
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.goto(url, wait_until="domcontentloaded", timeout=60_000)
    pg.wait_for_selector("#txt2img-generate", timeout=60_000)
    try:
        yield pg
    finally:
        ctx.close()


# ---- page helpers -----------------------------------------------------------------------------

def _tab(page, name):
    page.get_by_role("tab", name=name, exact=True).click()


def _number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")
    box.blur()  # Gradio takes the value on change/blur


def _radio(page, elem_id, label):
    page.locator(f"#{elem_id}").get_by_text(label, exact=True).click()


def _dropdown(page, elem_id, option):
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).click()


def _upload(page, elem_id, path):
    page.locator(f"#{elem_id} input[type=file]").first.set_input_files(str(path))
    page.wait_for_selector(f"#{elem_id} img, #{elem_id} canvas", timeout=30_000)


def _upload_unit(page, tab, i, path):
    """Upload a unit's image and wait until the upload has enabled the unit (as the user sees it)."""
    _upload(page, f"{tab}-unit{i}-image", path)
    page.locator(f"#{tab}-unit{i}-enable input[type=checkbox]").wait_for(state="attached")
    page.wait_for_function(f"() => document.querySelector('#{tab}-unit{i}-enable input[type=checkbox]').checked",
                           timeout=60_000)


def _fetch(page, src) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def _gallery_srcs(page, tab):
    return page.locator(f"#{tab}-gallery img").evaluate_all("els => els.map(e => e.src)")


def _toast(page):
    return page.locator(".toast-body").first.inner_text() if page.locator(".toast-body").count() else None


def _generate(page, tab) -> list[str]:
    """Press Generate and wait for new images (every run writes new files, so the gallery's first
    image changes) or an error toast; returns the image addresses."""
    before = (_gallery_srcs(page, tab) or [None])[0]
    page.locator(f"#{tab}-generate").click()
    page.wait_for_function(
        "([tab, before]) => { const i = document.querySelector(`#${tab}-gallery img`);"
        " return document.querySelector('.toast-body') || (i && i.src !== before); }",
        arg=[tab, before], timeout=RUN_TIMEOUT)
    assert _toast(page) is None, _toast(page)
    srcs = _gallery_srcs(page, tab)
    assert srcs and srcs[0] != before
    return srcs


def _map(size=64, shape="circle", at=(0.5, 0.5)) -> np.ndarray:
    """A fill50k-like control map: a white outline on black."""
    import cv2

    m = np.zeros((size, size, 3), np.uint8)
    c = (int(at[0] * size), int(at[1] * size))
    if shape == "circle":
        cv2.circle(m, c, size // 4, (255, 255, 255), 2)
    else:
        cv2.rectangle(m, (c[0] - size // 5, c[1] - size // 5), (c[0] + size // 5, c[1] + size // 5), (255, 255, 255), 2)
    return m


def _save(arr, path) -> Path:
    Image.fromarray(arr).save(path)
    return path


def _diff(a, b) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


# ---- tests --------------------------------------------------------------------------------------

def test_two_units_with_different_control_modes(page, loaded, tmp_path):
    from ctrlnet.pipeline import ControlSpec, GenerationRequest, generate

    a, b = _map(shape="circle", at=(0.35, 0.4)), _map(shape="square", at=(0.65, 0.6))
    page.locator("#txt2img-prompt textarea").fill("a red circle on a blue background")
    _number(page, "txt2img-seed", 11)
    _upload_unit(page, "txt2img", 0, _save(a, tmp_path / "a.png"))  # uploading enables the unit
    one = _fetch(page, _generate(page, "txt2img")[0])
    info_one = page.locator("#txt2img-info textarea").input_value()
    page.get_by_text("ControlNet Unit 1", exact=True).click()
    _upload_unit(page, "txt2img", 1, _save(b, tmp_path / "b.png"))
    images = {}
    for label, mode in (("ControlNet is more important", "controlnet"), ("My prompt is more important", "prompt"),
                        ("Balanced", "balanced")):
        _radio(page, "txt2img-unit1-control-mode", label)
        images[mode] = _fetch(page, _generate(page, "txt2img")[0])
    page.screenshot(path=str(SHOTS / "txt2img.png"), full_page=True)
    info = page.locator("#txt2img-info textarea").input_value()
    assert 'ControlNet 1: "Module: none, Model: demo' in info and "Control Mode: balanced" in info
    diffs = {"one vs controlnet": _diff(one, images["controlnet"]), "one vs balanced": _diff(one, images["balanced"]),
             "controlnet vs prompt": _diff(images["controlnet"], images["prompt"]),
             "prompt vs balanced": _diff(images["prompt"], images["balanced"])}
    print("mean differences:", diffs)
    assert min(diffs.values()) > 1.0, diffs
    # the page made exactly what generate() makes with the same settings
    req = GenerationRequest(prompt="a red circle on a blue background", added_prompt="", negative_prompt="",
                            width=64, height=64, steps=4, guidance_scale=5.0, seed=11, sampler="DDIM",
                            controls=[ControlSpec(a, "demo", detect_resolution=512),
                                      ControlSpec(b, "demo", detect_resolution=512, control_mode="controlnet")])
    assert np.array_equal(generate(loaded.models, req).images[0], images["controlnet"])
    req.controls = req.controls[:1]
    assert np.array_equal(generate(loaded.models, req).images[0], one), info_one
    assert 'ControlNet 0: "Module: none, Model: demo' in info_one and "ControlNet 1" not in info_one


def test_img2img_follows_the_denoising_strength(page, loaded, tmp_path):
    import torch

    from ctrlnet.generation.latents import decode_images, encode_images

    init = _photo(64, 96)
    _tab(page, "img2img")
    _upload(page, "img2img-init", _save(init, tmp_path / "init.png"))
    page.wait_for_function("() => document.querySelector('#img2img-width input[type=number]').value === '96'",
                           timeout=30_000)  # the size follows the uploaded image
    assert page.locator("#img2img-height input[type=number]").input_value() == "64"
    page.locator("#img2img-prompt textarea").fill("a white square")
    _number(page, "img2img-seed", 5)
    out = {}
    for strength in (0.3, 0.9):
        _number(page, "img2img-denoise", strength)
        out[strength] = _fetch(page, _generate(page, "img2img")[0])
    page.screenshot(path=str(SHOTS / "img2img.png"), full_page=True)
    with torch.no_grad():
        kept = decode_images(loaded.models, encode_images(loaded.models, [init]))[0]  # what strength 0 keeps
    low, high = _diff(out[0.3], kept), _diff(out[0.9], kept)
    print(f"mean difference from the kept image: strength 0.3 {low:.1f}, 0.9 {high:.1f}; "
          f"from the init image: {_diff(out[0.3], init):.1f}, {_diff(out[0.9], init):.1f}")
    assert out[0.3].shape == init.shape and low < 0.5 * high  # measured 3.1 and 58.3 (4 steps: 1 vs 3 run)
    assert _diff(out[0.3], init) < _diff(out[0.9], init)


def test_inpaint_mask_drawn_with_the_mouse(page, served, tmp_path):
    _, out_dir = served
    init = _photo(64, 96)
    _tab(page, "inpaint")
    # as a user does: the editor's upload tool opens the file chooser
    with page.expect_file_chooser() as chooser:
        page.locator("#inpaint-editor button[aria-label='Upload']").first.click()
    chooser.value.set_files(str(_save(init, tmp_path / "init.png")))
    # the server has the image once the size follows it (the editor uploads it asynchronously)
    page.wait_for_function("() => document.querySelector('#inpaint-width input[type=number]').value === '96'",
                           timeout=60_000)
    canvas = page.locator("#inpaint-editor canvas").first
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2  # the image is centred
    page.mouse.move(cx - 60, cy)
    page.mouse.down()
    # a horizontal stroke across the middle with the brush (few events: each redraws the WebGL
    # canvas, slow in software rendering)
    page.mouse.move(cx + 60, cy, steps=4)
    page.mouse.up()
    page.wait_for_timeout(500)
    page.locator("#inpaint-prompt textarea").fill("a green square")
    _number(page, "inpaint-mask-blur", 0)
    _number(page, "inpaint-denoise", 1)
    _number(page, "inpaint-seed", 21)
    result = _fetch(page, _generate(page, "inpaint")[0])
    page.screenshot(path=str(SHOTS / "inpaint.png"), full_page=True)
    mask = np.asarray(Image.open(out_dir / "21_mask.png").convert("L")) > 127  # the mask the run used
    ys, xs = np.nonzero(mask)
    print(f"mask: {mask.mean():.2%} of the image, rows {ys.min()}-{ys.max()}, columns {xs.min()}-{xs.max()}")
    assert 0.02 < mask.mean() < 0.8 and abs(ys.mean() - 32) < 10 and abs(xs.mean() - 48) < 10
    assert xs.max() - xs.min() > ys.max() - ys.min()  # a horizontal stroke
    d = np.abs(result.astype(int) - init.astype(int))
    print(f"outside the mask: max difference {d[~mask].max()}; inside: mean {d[mask].mean():.1f}")
    assert d[~mask].max() <= 1 and d[mask].mean() > 10


def test_preview_shows_the_annotator_map_and_can_be_used(page, served, tmp_path):
    from ctrlnet.annotators import run_annotator
    from ctrlnet.annotators.availability import missing_weights
    from ctrlnet.generation.conditioning import display_map
    from ctrlnet.generation.preprocess import control_map
    from ctrlnet.image import HWC3, resize_image
    from ctrlnet.pipeline import ControlSpec

    photo = _photo(128, 128)
    _upload_unit(page, "txt2img", 0, _save(photo, tmp_path / "photo.png"))
    _dropdown(page, "txt2img-unit0-annotator", "canny")
    page.wait_for_selector("#txt2img-unit0-param-low_threshold", state="visible")
    _number(page, "txt2img-unit0-param-low_threshold", 50)
    _number(page, "txt2img-unit0-resolution", 128)
    page.locator("#txt2img-unit0-preview-btn").click()
    page.wait_for_selector("#txt2img-unit0-preview img, .toast-body", timeout=RUN_TIMEOUT)
    assert _toast(page) is None, _toast(page)
    shown = _fetch(page, page.locator("#txt2img-unit0-preview img").first.get_attribute("src"))
    want = HWC3(run_annotator("canny", resize_image(photo, 128), low_threshold=50, high_threshold=200))
    assert np.array_equal(shown, want)
    # "Use this map": the map becomes the unit's image, with preprocessor none
    page.locator("#txt2img-unit0-use-map").click()
    page.wait_for_function("() => document.querySelector('#txt2img-unit0-annotator input').value === 'none'",
                           timeout=30_000)
    _number(page, "txt2img-seed", 3)
    _generate(page, "txt2img")
    used = _fetch(page, page.locator("#txt2img-maps img").first.get_attribute("src"))
    expect = display_map(control_map(ControlSpec(), want, (64, 64)))
    assert np.array_equal(used, expect)
    page.screenshot(path=str(SHOTS / "txt2img_preview.png"), full_page=True)
    if missing_weights("hed"):  # a preprocessor without weights says where to put them, uncut
        _dropdown(page, "txt2img-unit0-annotator", "hed (weights missing)")
        note = page.locator("#txt2img-unit0-weights-note")
        note.wait_for(state="visible")
        assert "ControlNetHED.pth" in note.inner_text() and "$CTRLNET_ANNOTATOR_DIR" in note.inner_text()
        page.locator("#txt2img-unit0-preview-btn").click()
        page.wait_for_selector(".toast-body", timeout=30_000)
        toast = _toast(page)
        assert "resolve/main/ControlNetHED.pth into the server's annotator folder" in toast, toast
        assert "lllyasviel/Annotators)." in toast and "/tmp" not in toast and "/root" not in toast


def test_interrupt_stops_a_long_run(page):
    _number(page, "txt2img-steps", 150)
    _number(page, "txt2img-batch-count", 100)  # 15000 steps: minutes of work
    page.locator("#txt2img-generate").click()
    page.wait_for_function("() => /\\d+\\/15k steps/.test(document.body.innerText)", timeout=RUN_TIMEOUT)  # running
    # the live preview: the last x0 estimate at latent size (64 px / 8), refreshed while it runs
    live = page.locator("#txt2img-live-preview img")
    live.wait_for(state="visible", timeout=RUN_TIMEOUT)
    page.wait_for_function("() => document.querySelector('#txt2img-live-preview img').naturalWidth > 0",
                           timeout=30_000)
    assert live.evaluate("e => [e.naturalWidth, e.naturalHeight]") == [8, 8]
    first = live.get_attribute("src")
    page.wait_for_function("(src) => { const i = document.querySelector('#txt2img-live-preview img');"
                           " return i && i.src !== src; }", arg=first, timeout=60_000)
    page.locator("#txt2img-interrupt").click()
    page.wait_for_function("() => document.querySelector('#txt2img-status').innerText.includes('Interrupted')",
                           timeout=60_000)
    status = page.locator("#txt2img-status").inner_text()
    done = int(status.split("Interrupted after ")[1].split(" of ")[0])
    print(status)
    assert " of 15000 steps" in status and 0 < done < 15000
    assert "unfinished batch (not saved)" in status and _gallery_srcs(page, "txt2img")  # the picture so far
    assert page.locator("#txt2img-live-preview").is_hidden()
    # the app is usable again: a short run goes through
    _number(page, "txt2img-steps", 2)
    _number(page, "txt2img-batch-count", 1)
    _generate(page, "txt2img")
    assert page.locator("#txt2img-status").inner_text().startswith("Done: 1 image(s), 2 steps")


def test_png_info_round_trip(page, tmp_path):
    a = _map(shape="square", at=(0.4, 0.5))
    page.locator("#txt2img-prompt textarea").fill("a yellow square")
    _upload_unit(page, "txt2img", 0, _save(a, tmp_path / "a.png"))
    _radio(page, "txt2img-unit0-control-mode", "My prompt is more important")
    _number(page, "txt2img-unit0-weight", 0.7)
    _dropdown(page, "txt2img-sampler", "Euler a")
    _number(page, "txt2img-seed", 123)
    src = _generate(page, "txt2img")[0]
    made = page.request.get(src).body()
    (tmp_path / "made.png").write_bytes(made)
    first = np.asarray(Image.open(io.BytesIO(made)).convert("RGB"))
    # change what PNG info must restore
    page.locator("#txt2img-random-seed").click()
    _radio(page, "txt2img-unit0-control-mode", "Balanced")
    _number(page, "txt2img-unit0-weight", 1.0)
    _number(page, "txt2img-steps", 7)
    _dropdown(page, "txt2img-sampler", "DDIM")
    page.locator("#txt2img-prompt textarea").fill("something else")
    _tab(page, "PNG info")
    _upload(page, "png-info-image", tmp_path / "made.png")
    page.wait_for_function("() => document.querySelector('#png-info-text textarea').value.includes('Seed: 123')",
                           timeout=30_000)
    page.screenshot(path=str(SHOTS / "png_info.png"), full_page=True)
    page.locator("#png-info-to-txt2img").click()
    page.wait_for_function("() => document.querySelector('#txt2img-seed input').value === '123'", timeout=30_000)
    assert page.locator("#txt2img-prompt textarea").input_value() == "a yellow square"
    assert page.locator("#txt2img-sampler input").input_value() == "Euler a"
    again = _fetch(page, _generate(page, "txt2img")[0])
    assert np.abs(again.astype(int) - first.astype(int)).max() == 0


def test_reference_colorization_tab(page, served, tmp_path):
    from ctrlnet.colorize.lab import lightness, to_gray
    from ctrlnet.colorize.synthetic import synthetic_clip

    _, out = served
    ref, target = synthetic_clip(2, 96, seed=8)
    target = to_gray(target)  # what a user uploads: a grayscale picture
    _tab(page, "Reference colorization")
    page.locator("#input-colorize input[type=file]").set_input_files(str(_save(target, tmp_path / "gray.png")))
    page.locator("#reference-colorize input[type=file]").set_input_files(str(_save(ref, tmp_path / "ref.png")))
    page.wait_for_selector("#reference-colorize img", timeout=30_000)
    page.locator("#run-colorize").click()
    page.wait_for_selector("#result-colorize img, .toast-body", timeout=RUN_TIMEOUT)
    assert _toast(page) is None, _toast(page)
    page.screenshot(path=str(SHOTS / "colorize.png"), full_page=True)
    img = _fetch(page, page.locator("#result-colorize img").first.get_attribute("src"))
    assert img.shape == target.shape
    assert np.abs(lightness(img).astype(int) - lightness(target).astype(int)).max() <= 1
    assert len(list(out.glob("colorized-0*.png"))) == 1  # saved under the default seed 0
