"""`ctrlnet batch VIDEO --reference REF`: the fixed-mode reference colorization of
`ctrlnet colorize video`, its frames split over two processes (gloo, Accelerate), gives exactly the
frames one process does."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("av")
pytest.importorskip("accelerate")

from ctrlnet.colorize import video_job  # noqa: E402
from ctrlnet.colorize.reference import ColorizeOptions, load_colorizer_models  # noqa: E402
from ctrlnet.colorize.synthetic import synthetic_clip  # noqa: E402
from ctrlnet.colorize.video import count_frames, write_video  # noqa: E402
from ctrlnet.image import save_image  # noqa: E402
from serve_process import free_port  # noqa: E402

N = 3  # frames
CLI = ["--base", "random:tiny-sd1", "--colorizer", "random", "--device", "cpu", "--resolution", "64", "--steps", "1",
       "--seed", "3", "--keep-frames", "--no-progress"]


def _worker(rank: int, world: int, port: int, clip: str, ref: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)  # as in the one-process run (CPU sums depend on the thread count)
    from ctrlnet.interfaces.cli import main

    assert main(["batch", clip, "--reference", ref, "--out", out, *CLI]) == 0
    torch.distributed.destroy_process_group()


def test_two_processes_colour_the_frames_one_process_does(tmp_path):
    import torch
    import torch.multiprocessing as mp

    frames = [f[:, :64] for f in synthetic_clip(N, 64, seed=11)]
    clip = tmp_path / "gray.mp4"
    write_video(frames, clip, 15)
    ref = save_image(frames[0], tmp_path / "ref.png")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = load_colorizer_models("random:tiny-sd1", "random", device="cpu", dtype="auto")
        video_job.colorize_video(models, clip, frames[0], tmp_path / "one.mp4", "fixed",
                                 ColorizeOptions(resolution=64, steps=1, seed=3), keep_frames=True, progress=False,
                                 model_name="random")
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, free_port(), str(clip), str(ref), str(tmp_path / "two.mp4")), nprocs=2, join=True)

    one = sorted((tmp_path / "one.mp4.work" / "frames").glob("*.png"))
    two = sorted((tmp_path / "two.mp4.work" / "frames").glob("*.png"))
    assert [p.name for p in one] == [p.name for p in two] == [f"{i:06d}.png" for i in range(N)]
    for a, b in zip(one, two):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert count_frames(tmp_path / "two.mp4") == N


def test_video_input_needs_a_reference_and_other_modes_do_not_split(tmp_path, capsys):
    from ctrlnet.interfaces.cli import main

    clip = tmp_path / "gray.mp4"
    write_video(synthetic_clip(2, 32, seed=1), clip, 10)
    assert main(["batch", str(clip), "--out", str(tmp_path / "o.mp4"), *CLI]) == 2
    assert "needs --reference" in capsys.readouterr().err

    class TwoProcesses:  # what colorize_video reads of Accelerate's state
        num_processes = 2

    with pytest.raises(ValueError, match="only the fixed mode splits"):
        video_job.colorize_video(None, clip, None, tmp_path / "r.mp4", "recursive", processes=TwoProcesses())
