"""Two CPU processes (gloo) through Accelerate: both ranks end with identical weights and EMA."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    # the environment torchrun / accelerate launch would set
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from ctrlnet.config import TINY_SD1
    from ctrlnet.models.controlnet import ControlNet
    from ctrlnet.training.data import prompt_json_dataset
    from ctrlnet.training.loop import TrainConfig, train
    from ctrlnet.training.models import build_models

    acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    assert acc.num_processes == world and acc.process_index == rank
    # rank-dependent init: DDP must broadcast rank 0's weights, or the ranks would differ
    m = build_models(TINY_SD1, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.unet.out.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    m.controlnet = ControlNet.from_unet(m.unet)
    with torch.no_grad():
        for p in m.controlnet.zero_convs.parameters():
            p.add_(0.01 * (rank + 1))
    cfg = TrainConfig(steps=2, batch_size=1, lr=1e-3, checkpoint_every=0, progress=False, cpu=True, log_every=0,
                      prompt_dropout=0.5, ema_decay=0.5)
    res = train(m, prompt_json_dataset(data), cfg, Path(out) / "run", accelerator=acc)
    torch.save({"cn": m.controlnet.state_dict(), "losses": res.losses, "ema": res.ema}, Path(out) / f"rank{rank}.pt")
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()


def test_two_process_gloo_ranks_end_identical(tmp_path):
    import torch.multiprocessing as mp

    from ctrlnet.training.builders import make_fill50k

    make_fill50k(tmp_path / "data", 4, 64, seed=1)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "data"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["losses"] == r1["losses"]  # the logged loss is the mean over ranks
    changed = False
    for k, v in r0["cn"].items():
        assert torch.equal(v, r1["cn"][k]), k
        if k.startswith("zero_convs.0.0.weight"):
            changed = not torch.allclose(v, torch.full_like(v, 0.01))
    assert changed
    # the EMA starts after DDP's broadcast, so it is the same on both ranks and differs from the weights
    assert r0["ema"].keys() == r1["ema"].keys() and r0["ema"]
    for k, v in r0["ema"].items():
        assert torch.equal(v, r1["ema"][k]), k
    k = "controlnet.zero_convs.0.0.weight"
    assert not torch.equal(r0["ema"][k], r0["cn"]["zero_convs.0.0.weight"])
    # only the main process writes the log
    assert len((tmp_path / "run" / "loss.csv").read_text().splitlines()) == 3
