"""Image and video colorization end to end on tiny random models: fixed and recursive modes write
a playable video of the right frame count, rate and size; resuming redoes only missing frames;
the CLI builders parse and run."""

import argparse

import numpy as np
import pytest

av = pytest.importorskip("av")

from ctrlnet.colorize import video_job  # noqa: E402
from ctrlnet.colorize.lab import lightness  # noqa: E402
from ctrlnet.colorize.reference import ColorizeOptions, colorize_image, load_colorizer_models  # noqa: E402
from ctrlnet.colorize.synthetic import synthetic_clip  # noqa: E402
from ctrlnet.colorize.video import count_frames, probe, write_video  # noqa: E402

OPTS = ColorizeOptions(resolution=64, steps=1, seed=3)
N = 3  # frames


@pytest.fixture(scope="module")
def models():
    return load_colorizer_models("random:tiny-sd1", "random", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    frames = [f[:, :90] for f in synthetic_clip(N, 96, seed=11)]  # 90x96: not square
    path = tmp_path_factory.mktemp("clip") / "gray.mp4"
    write_video(frames, path, 15)
    return path, frames


def test_colorize_image_keeps_size_and_lightness(models, clip):
    _, frames = clip
    out = colorize_image(models, frames[1], frames[0], OPTS)
    assert out.shape == frames[1].shape and out.dtype == np.uint8
    assert np.abs(lightness(out).astype(int) - lightness(frames[1]).astype(int)).max() <= 1
    other = colorize_image(models, frames[1], frames[0][..., ::-1].copy(), OPTS)
    assert not np.array_equal(out, other)  # the reference matters


@pytest.mark.parametrize("mode", ["fixed", "anchored", "recursive"])
def test_video_modes_write_playable_file(models, clip, tmp_path, mode, monkeypatch):
    path, frames = clip
    refs = []
    real = video_job.colorize_image

    def spy(m, frame, ref, options):
        refs.append(ref.copy())
        return real(m, frame, ref, options)

    monkeypatch.setattr(video_job, "colorize_image", spy)
    out = tmp_path / f"{mode}.mp4"
    video_job.colorize_video(models, path, frames[0], out, mode, OPTS, keep_frames=True, progress=False)
    info = probe(out)
    assert count_frames(out) == N
    assert (info.width, info.height, info.fps) == (90, 96, 15)
    work = video_job.work_dir_for(out) / "frames"
    done = sorted(work.glob("*.png"))
    assert len(done) == N and len(refs) == N
    from ctrlnet.image import load_image

    results = [load_image(p) for p in done]
    assert np.array_equal(refs[0], frames[0])
    if mode == "fixed":
        assert all(np.array_equal(r, frames[0]) for r in refs)
    elif mode == "anchored":  # N = 10 (the default) on 3 frames: as recursive
        assert all(np.array_equal(refs[i], results[i - 1]) for i in range(1, N))
    else:  # each frame after the previous result
        assert all(np.array_equal(refs[i], results[i - 1]) for i in range(1, N))


def test_reference_source_table():
    from ctrlnet.colorize.modes import reference_source

    def table(mode, n=None, frames=7):
        return "".join("F" if reference_source(i, mode, n) == "fixed" else "p" for i in range(frames))

    assert table("fixed") == "FFFFFFF"
    assert table("recursive") == "Fpppppp"
    assert table("anchored", 3) == "FppFppF"
    assert table("anchored", 1) == table("fixed") and table("anchored", 7) == table("recursive")
    with pytest.raises(ValueError, match="anchor_every"):
        reference_source(1, "anchored", 0)
    with pytest.raises(ValueError, match="mode must be"):
        reference_source(1, "sticky")


def test_anchored_mode_uses_the_reference_every_n_frames(models, tmp_path, monkeypatch):
    """N=1 gives fixed's frames exactly, N >= frames recursive's exactly; N=2 takes the reference at
    frames 0 and 2 and the previous result at 1 (on a 5-frame clip: 0, 2, 4 and 1, 3)."""
    from ctrlnet.image import load_image

    frames = [f[:, :64] for f in synthetic_clip(5, 64, seed=12)]
    path = tmp_path / "five.mp4"
    write_video(frames, path, 10)

    def run(mode, n=None, spy=None):
        out = tmp_path / f"{mode}{n}.mp4"
        video_job.colorize_video(models, path, frames[0], out, mode, OPTS, keep_frames=True, progress=False,
                                 anchor_every=n)
        return [load_image(p) for p in sorted((video_job.work_dir_for(out) / "frames").glob("*.png"))]

    fixed, recursive = run("fixed"), run("recursive")
    assert not all(np.array_equal(a, b) for a, b in zip(fixed[1:], recursive[1:]))  # the modes differ here
    assert all(np.array_equal(a, b) for a, b in zip(run("anchored", 1), fixed))
    assert all(np.array_equal(a, b) for a, b in zip(run("anchored", 5), recursive))
    assert all(np.array_equal(a, b) for a, b in zip(run("anchored", 50), recursive))
    refs = []
    real = video_job.colorize_image
    monkeypatch.setattr(video_job, "colorize_image", lambda m, f, ref, o: refs.append(ref.copy()) or real(m, f, ref, o))
    got = run("anchored", 2)
    assert len(refs) == 5
    assert [np.array_equal(r, frames[0]) for r in refs] == [True, False, True, False, True]
    assert np.array_equal(refs[1], got[0]) and np.array_equal(refs[3], got[2])
    with pytest.raises(ValueError, match="anchored mode only"):
        video_job.colorize_video(models, path, frames[0], tmp_path / "x.mp4", "fixed", OPTS, anchor_every=3)


def test_video_resume_redoes_only_missing_frames(models, clip, tmp_path, monkeypatch):
    path, frames = clip
    out = tmp_path / "r.mp4"
    video_job.colorize_video(models, path, frames[0], out, "recursive", OPTS, keep_frames=True, progress=False)
    work = video_job.work_dir_for(out)
    first = {p.name: p.read_bytes() for p in (work / "frames").glob("*.png")}
    (work / "frames" / f"{N - 1:06d}.png").unlink()
    # a different job in the same work folder is refused, naming the difference
    with pytest.raises(ValueError, match="mode"):
        video_job.colorize_video(models, path, frames[0], out, "fixed", OPTS, progress=False)
    calls = []
    real = video_job.colorize_image
    monkeypatch.setattr(video_job, "colorize_image", lambda *a: calls.append(1) or real(*a))
    video_job.colorize_video(models, path, frames[0], out, "recursive", OPTS, keep_frames=True, progress=False)
    assert len(calls) == 1  # only the missing last frame, after the stored previous result
    assert {p.name: p.read_bytes() for p in (work / "frames").glob("*.png")} == first  # same job, same frames
    assert count_frames(out) == N
    video_job.colorize_video(models, path, frames[0], out, "recursive", OPTS, progress=False)
    assert len(calls) == 1 and not work.exists()  # nothing to redo; the work folder goes after success


def test_cli_builders(clip, tmp_path):
    from ctrlnet.image import load_image, save_image
    from ctrlnet.interfaces.colorize_cli import add_colorize_parser, add_video_pairs_parser

    path, frames = clip
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_colorize_parser(sub)
    data = sub.add_parser("data").add_subparsers(dest="data_command")
    add_video_pairs_parser(data)
    gray, ref = save_image(frames[2], tmp_path / "g.png"), save_image(frames[0], tmp_path / "c.png")
    args = parser.parse_args(["colorize", "image", str(gray), "--reference", str(ref), "--out", str(tmp_path / "o.png"),
                              "--base", "random:tiny-sd1", "--colorizer", "random", "--resolution", "64",
                              "--steps", "1", "--device", "cpu"])
    assert args.func(args) == 0
    assert load_image(tmp_path / "o.png").shape == frames[2].shape
    # a second run does not write over the first's image (it did, silently), nor ever over its input
    first = (tmp_path / "o.png").read_bytes()
    with pytest.raises(ValueError, match=r"o\.png exists; pass --force to replace it"):
        args.func(args)
    assert (tmp_path / "o.png").read_bytes() == first
    args.out, args.force = str(gray), True
    with pytest.raises(ValueError, match=r"g\.png is an input of this command"):
        args.func(args)
    args = parser.parse_args(["colorize", "video", str(path), "--reference", str(ref), "--mode", "recursive"])
    # steps and guidance: None = the colorizer file's (20 and 1 for the shipped one)
    assert (args.mode, args.guidance_scale, args.steps, args.keep_luminance) == ("recursive", None, None, True)
    args = parser.parse_args(["colorize", "video", str(path), "--reference", str(ref), "--mode", "anchored",
                              "--anchor-every", "4"])
    assert (args.mode, args.anchor_every) == ("anchored", 4)
    for bad, msg in [(["--mode", "fixed", "--anchor-every", "4"], "applies to --mode anchored"),
                     (["--mode", "anchored", "--anchor-every", "0"], "anchor_every >= 1")]:
        args = parser.parse_args(["colorize", "video", str(path), "--reference", str(ref), *bad])
        with pytest.raises(ValueError, match=msg):
            args.func(args)  # refused before any model loads
    args = parser.parse_args(["data", "video-pairs", str(path), str(tmp_path / "pairs"), "--similarity", "0.5", "0.99",
                              "--min-gap", "2"])
    assert args.func(args) == 0
    assert (tmp_path / "pairs" / "prompt.json").is_file()
    args = parser.parse_args(["colorize", "lineart", str(gray)])
    with pytest.raises(ValueError, match="--controlnet"):
        args.func(args)


def test_video_job_never_replaces_another_output_silently(models, clip, tmp_path, capsys):
    import subprocess
    import sys

    path, frames = clip
    out = tmp_path / "v.mp4"
    out.write_bytes(b"an earlier video")
    with pytest.raises(ValueError) as e:
        video_job.colorize_video(models, path, frames[0], out, "fixed", OPTS, progress=False)
    assert str(e.value) == (f"{out} holds an earlier video (a video of 0.0 MiB); pass --overwrite to move it aside, "
                            "or choose another --out")
    assert out.read_bytes() == b"an earlier video" and not video_job.work_dir_for(out).exists()
    # a killed frame write and a killed encode left temp files: removed at the start
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    work = video_job.work_dir_for(out)
    (work / "frames").mkdir(parents=True)
    stale = [work / "frames" / f".000001.png.{dead.pid}.tmp", tmp_path / f".v.mp4.{dead.pid}.tmp.mp4"]
    for p in stale:
        p.write_bytes(b"partial")
    capsys.readouterr()
    video_job.colorize_video(models, path, frames[0], out, "fixed", OPTS, progress=False, overwrite=True,
                             keep_frames=True)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("v.replaced-")]
    assert len(moved) == 1 and moved[0].suffix == ".mp4" and moved[0].read_bytes() == b"an earlier video"
    text = capsys.readouterr().out
    assert f"moved the earlier video in {out} aside to {moved[0]}\n" in text
    assert not any(p.exists() for p in stale) and count_frames(out) == N
    # the same job again (its frames kept) may rewrite its own output; once its work folder is
    # gone, the output is an earlier job's like any other
    video_job.colorize_video(models, path, frames[0], out, "fixed", OPTS, progress=False)
    assert count_frames(out) == N and not work.exists()
    with pytest.raises(ValueError, match="holds an earlier video"):
        video_job.colorize_video(models, path, frames[0], out, "fixed", OPTS, progress=False)
