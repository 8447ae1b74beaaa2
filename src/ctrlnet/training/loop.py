"""The training loop, on Hugging Face Accelerate (DDP on several GPUs or CPU processes).

One loop trains a ControlNet (``mode="controlnet"``, the original ``tutorial_train.py``), a
latent-diffusion base from scratch (``"base"``: UNet and text encoder) or the VAE (``"vae"``,
L1 + KL reconstruction). Exact resumption: data order and all noise are pure functions of
(seed, step, micro-batch, rank), and the checkpoint holds weights, optimizer, scheduler, EMA,
grad scaler, global RNG states and step.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ctrlnet.sampling.schedule import DiscreteSchedule
from ctrlnet.training import state as st
from ctrlnet.training.data import DataError, collate, worker_message
from ctrlnet.training.logger import RunLogger, plot_loss
from ctrlnet.training.models import (
    Mode,
    TrainModels,
    export_models,
    select_trainable,
    set_gradient_checkpointing,
)
from ctrlnet.training.previews import write_preview
from ctrlnet.training.run_start import RunStart, plan_run, run_inputs


@dataclass
class TrainConfig:
    """Everything that shapes a run (stored in each checkpoint)."""

    mode: Mode = "controlnet"
    steps: int = 1000  # optimizer steps
    batch_size: int = 4  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_decay: str = "constant"  # or "cosine" (to 10% of lr at the last step)
    max_grad_norm: float = 0.0  # 0: no clipping
    sd_locked: bool = True
    only_mid_control: bool = False
    train_text: bool = True  # base mode
    prompt_dropout: float = 0.5
    kl_weight: float = 1e-6  # vae mode
    train_encoder: bool = True  # vae mode: False trains only the decoder, on the frozen encoder's mean latents
    sample_latents: bool = True  # cached moments: False trains on the posterior mean (a deterministic AE)
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0: no EMA
    checkpoint_every: int = 500
    keep_last: int = 3
    keep_every: int = 0  # also keep checkpoints at multiples of this (0: none)
    sample_every: int = 0  # 0: no sample grids
    sample_steps: int = 20
    sample_count: int = 4
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    progress: bool = True
    cpu: bool = False  # force the CPU even where a GPU exists

    def __post_init__(self):
        if self.mode not in ("controlnet", "base", "vae"):
            raise ValueError(f"mode must be controlnet, base or vae, got {self.mode!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if not 0.0 <= self.prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1], got {self.prompt_dropout}")
        if self.steps < 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps >= 0, batch_size >= 1 and grad_accum >= 1 are required")


@dataclass
class TrainResult:
    step: int
    last_loss: float
    run_dir: Path
    checkpoint: Path | None
    skipped: int = 0
    losses: list[float] = field(default_factory=list)
    ema: dict | None = None  # the EMA's shadow weights (trainable name -> tensor), when ema_decay > 0


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, micro, rank, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class StepBatches:
    """Infinite, resumable batch indices: epoch ``e`` is a permutation seeded by (seed, e); global
    micro-batch ``b`` takes positions ``[b*B*W, (b+1)*B*W)`` of the stream and rank ``r`` its slice
    ``r*B .. (r+1)*B``. Each index comes with a crop seed for the data set."""

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0, start: int = 0):
        self.n, self.b, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.start = start
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(derived_seed(self.seed, epoch, 7)).permutation(self.n)}
        return self._perms[epoch]

    def batch(self, b: int) -> list[tuple[int, int]]:
        out = []
        base = (b * self.world + self.rank) * self.b
        for pos in range(base, base + self.b):
            epoch, i = divmod(pos, self.n)
            out.append((int(self._perm(epoch)[i]), derived_seed(self.seed, pos, 11)))
        return out

    def __iter__(self):
        b = self.start
        while True:
            yield self.batch(b)
            b += 1


class DiffusionObjective(nn.Module):
    """eps (or v) MSE of the original ``p_losses`` (l_simple, unit weights, no ELBO term)."""

    def __init__(self, models: TrainModels, mode: str, only_mid_control: bool = False):
        super().__init__()
        self.unet, self.text = models.unet, models.text
        self.controlnet = models.controlnet if mode == "controlnet" else None
        self.only_mid_control = only_mid_control
        self.schedule = DiscreteSchedule(models.config.schedule)
        self.register_buffer("alphas_cumprod", self.schedule.alphas_cumprod.float(), persistent=False)

    def forward(self, x0: torch.Tensor, ids: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                hint: torch.Tensor | None = None) -> torch.Tensor:
        # x0, noise: (B, C, h, w) scaled latents; ids: (B, L); t: (B,); hint: (B, 3, 8h, 8w)
        train_text = any(p.requires_grad for p in self.text.parameters())
        with torch.set_grad_enabled(train_text and torch.is_grad_enabled()):
            context = self.text.encode_ids(ids)  # (B, L, D)
        ac = self.alphas_cumprod[t][:, None, None, None]
        x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        control = None
        if self.controlnet is not None:
            control = self.controlnet(x_t, hint, t, context)
        out = self.unet(x_t, t, context, control=control, only_mid_control=self.only_mid_control)
        if self.schedule.parameterization == "v":
            target = ac.sqrt() * noise - (1 - ac).sqrt() * x0
        else:
            target = noise
        return F.mse_loss(out.float(), target.float())


class VAEObjective(nn.Module):
    """Reconstruction L1 + ``kl_weight`` * KL (per pixel and per latent element, as LDM's
    LPIPSWithDiscriminator without the LPIPS and GAN terms)."""

    def __init__(self, models: TrainModels, kl_weight: float, train_encoder: bool = True):
        super().__init__()
        self.vae = models.vae
        self.kl_weight = kl_weight
        self.train_encoder = train_encoder

    def forward(self, x: torch.Tensor, noise_seed: torch.Tensor) -> torch.Tensor:
        if not self.train_encoder:  # the latent space is fixed; the decoder learns to read its means
            with torch.no_grad():
                z = self.vae.encode(x).mean
            return (self.vae._decode_unscaled(z).float() - x.float()).abs().mean()
        post = self.vae.encode(x)
        g = torch.Generator(device="cpu").manual_seed(int(noise_seed))
        z = post.sample(g)
        rec = self.vae._decode_unscaled(z)
        l1 = (rec.float() - x.float()).abs().mean()
        kl = post.kl().mean() / x[0].numel()
        return l1 + self.kl_weight * kl


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        w = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        if cfg.lr_decay == "cosine" and cfg.steps > 0:
            frac = min(1.0, step / cfg.steps)
            w *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        return w

    return f


def _release_precision(mixed_precision: str) -> None:
    """Accelerate keeps one process-wide state and refuses a second ``Accelerator`` with another
    precision; a process that trains twice (tests, a service, a notebook) may ask for a new one.
    Only the precision part is dropped: the process group (``PartialState``) stays."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


class _StopFlag:
    """SIGTERM/SIGINT -> finish the step, write a checkpoint, stop (the main thread only)."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stop:  # second signal: give up at once
            raise KeyboardInterrupt
        self.stop = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _apply_schedule_settings(optimizer, scheduler, cfg: TrainConfig) -> None:
    """After loading the optimizer and scheduler states (which carry the checkpoint's lr, weight
    decay and base rates): set this run's, and recompute the rate of the next step from this
    run's lr, warmup, decay and total steps. With unchanged settings this reproduces the loaded
    values exactly (``LambdaLR`` computes ``base_lr * lambda(last_epoch)`` the same way)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
        group["weight_decay"] = cfg.weight_decay
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, lmbda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = cfg.lr * lmbda(scheduler.last_epoch)


def train(models: TrainModels, dataset, cfg: TrainConfig, run_dir, resume: bool | str = False,
          preview_batch: dict | None = None, accelerator=None, overwrite: bool = False,
          start: RunStart | None = None) -> TrainResult:
    """Train ``models`` on ``dataset`` per ``cfg``; checkpoints, logs and samples go to ``run_dir``.

    ``resume``: True continues from the newest checkpoint in ``run_dir/checkpoints`` that loads,
    a path continues from that file; ``overwrite`` moves an earlier run in ``run_dir`` aside. A
    fresh run refuses a folder that holds one. See :func:`plan_run` for every rule; pass its
    ``start`` to decide before the models are built (the command line does), else it is made
    here. The models must be built the same way as in the first run (the checkpoint holds only
    the trainable weights; a different model config is refused). Returns the final step and loss.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if start is None:
        start = plan_run(run_dir, cfg, resume, overwrite)
    elif start.run_dir != run_dir:
        raise ValueError(f"the start was planned for {start.run_dir}, not {run_dir}")
    start.check_models(models)
    if accelerator is None:
        _release_precision(cfg.mixed_precision)
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision, cpu=cfg.cpu,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        )
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process

    trainable = select_trainable(models, cfg.mode, cfg.sd_locked, cfg.only_mid_control, cfg.train_text,
                                 cfg.train_encoder)
    if not trainable:
        raise ValueError("nothing to train")
    inputs_record = run_inputs(dataset, models, trainable)
    start.check_inputs(inputs_record)  # a resume with other data or another base is refused
    for m in models.modules().values():
        m.to(device)
        m.train() if any(p.requires_grad for p in m.parameters()) else m.eval()
        if cfg.gradient_checkpointing:
            set_gradient_checkpointing(m, True)
    if cfg.mode == "vae":
        objective: nn.Module = VAEObjective(models, cfg.kl_weight, cfg.train_encoder)
    else:
        objective = DiffusionObjective(models, cfg.mode, cfg.only_mid_control)
    objective.to(device)
    params = list(trainable.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))

    # every rank has planned (read the folder) before the main process renames anything in it
    accelerator.wait_for_everyone()
    if main:
        for note in start.begin():
            print(note, flush=True)
    accelerator.wait_for_everyone()

    # resume before wrapping, so every rank starts from the same state
    step, micro_seen, ckpt_path = 0, 0, None
    loaded = None
    if start.state is not None:
        loaded = (start.checkpoint, start.state)
        ckpt_path, state = loaded
        missing = set(trainable) - set(state["trainable"])
        if missing:
            raise ValueError(f"{ckpt_path}: checkpoint lacks trainable weights {sorted(missing)[:5]} "
                             "(was it written by a run with other settings?)")
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(state["trainable"][n].to(p.dtype))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _apply_schedule_settings(optimizer, scheduler, cfg)
        st.set_rng_state(state["rng"])
        step, micro_seen = state["step"], state["micro_batches"]
        if main:
            print(f"resumed from {ckpt_path} at step {step}", flush=True)
    else:
        st.seed_rng(cfg.seed)

    objective, optimizer = accelerator.prepare(objective, optimizer)
    # after prepare: DDP has broadcast rank 0's weights, so every rank's EMA starts the same
    ema = st.EMA(trainable.items(), cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None and loaded is not None and loaded[1].get("ema") is not None:
        ema.load_state_dict(loaded[1]["ema"])
    if loaded is not None and accelerator.scaler is not None and loaded[1].get("scaler"):
        accelerator.scaler.load_state_dict(loaded[1]["scaler"])

    batches = StepBatches(len(dataset), cfg.batch_size, world, rank, cfg.seed, start=micro_seen)
    # its own generator: an iterator's worker base seed would otherwise be drawn from the global
    # one, which a resumed run then holds one draw ahead of an uninterrupted run's
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=cfg.num_workers,
                        persistent_workers=cfg.num_workers > 0,
                        generator=torch.Generator().manual_seed(derived_seed(cfg.seed, micro_seen, 13)))
    data_iter = iter(loader)
    logger = RunLogger(run_dir, resume_step=step) if main else None
    tokenizer = models.text.tokenizer if models.text is not None else None
    vae = models.vae
    skipped_total = 0
    losses: list[float] = []
    last_loss = float("nan")

    def save(step_now: int) -> Path | None:
        accelerator.wait_for_everyone()
        path = None
        if main:
            state = {
                "trainable": {n: p.detach().cpu().clone() for n, p in trainable.items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": st.rng_state(), "micro_batches": micro_seen,
                "train_config": asdict(cfg), "model_config": asdict(models.config), "inputs": inputs_record,
            }
            path = st.save_checkpoint(ckpt_dir, step_now, state, cfg.keep_last, cfg.keep_every)
            plot_loss(logger.csv_path, run_dir / "loss.png", f"{cfg.mode} training loss")
        accelerator.wait_for_everyone()
        return path

    def prepare_inputs(batch: dict, g: torch.Generator):
        """Tensors for the objective from a collated batch (prompt dropout, VAE encoding)."""
        if cfg.mode == "vae":
            x = batch["jpg"].permute(0, 3, 1, 2).to(device)  # (B, 3, H, W)
            return (x, torch.randint(0, 2**62, (), generator=g))
        if "latents" in batch:  # cached posterior moments
            mean, logvar = batch["latents"].chunk(2, dim=1)
            eps = torch.randn(mean.shape, generator=g)
            std = (0.5 * logvar.clamp(-30, 20)).exp() if cfg.sample_latents else torch.zeros_like(logvar)
            z = (mean + std * eps) * vae.scale_factor
        else:
            x = batch["jpg"].permute(0, 3, 1, 2).to(device)
            with torch.no_grad():
                post = vae.encode(x.to(next(vae.parameters()).dtype))
                z = (post.sample(g) if cfg.sample_latents else post.mean) * vae.scale_factor
        z = z.float().to(device)  # (B, 4, h, w)
        b = z.shape[0]
        drop = torch.rand(b, generator=g) < cfg.prompt_dropout
        prompts = ["" if d else p for d, p in zip(drop.tolist(), batch["txt"])]
        ids = tokenizer(prompts, pad=models.text.pad).to(device)
        t = torch.randint(0, models.config.schedule.timesteps, (b,), generator=g).to(device)
        noise = torch.randn(z.shape, generator=g).to(device)
        hint = batch["hint"].permute(0, 3, 1, 2).to(device) if cfg.mode == "controlnet" else None
        return (z, ids, t, noise, hint)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, disable=not (main and cfg.progress), dynamic_ncols=True,
               mininterval=5.0, desc=cfg.mode)
    t_start = time.time()
    steps_this_run = 0
    with _StopFlag() as flag:
        while step < cfg.steps and not flag.stop:
            step_loss = 0.0
            for micro in range(cfg.grad_accum):
                try:
                    batch = next(data_iter)
                except DataError as e:  # from a worker: its message, not the worker's traceback
                    raise DataError(worker_message(e)) from None
                micro_seen += 1
                skipped_total += len(batch["skipped"])
                g = torch.Generator().manual_seed(derived_seed(cfg.seed, step, micro, rank))
                inputs = prepare_inputs(batch, g)
                sync = micro == cfg.grad_accum - 1
                ctx = accelerator.no_sync(objective) if not sync else contextlib.nullcontext()
                with ctx, accelerator.autocast():
                    loss = objective(*inputs)
                    accelerator.backward(loss / cfg.grad_accum)
                step_loss += float(loss.detach()) / cfg.grad_accum
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            lr_used = float(optimizer.param_groups[0]["lr"])  # what this step's update uses: the log shows it
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update(trainable.items())
            step += 1
            steps_this_run += 1
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"loss is {step_loss} at step {step}; lower the learning rate")
            # the mean over ranks is what the CSV shows
            loss_all = accelerator.reduce(torch.tensor([step_loss], device=device), reduction="mean")
            last_loss = float(loss_all)
            losses.append(last_loss)
            elapsed = time.time() - t_start
            if main:
                logger.log(step, last_loss, lr_used, elapsed, steps_this_run / max(elapsed, 1e-9),
                           skipped_total)
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", skipped=skipped_total, refresh=False)
                if cfg.log_every and step % cfg.log_every == 0 and not sys.stderr.isatty():
                    # plain lines for log files, where the bar's redraws are hard to read
                    print(f"step {step} loss {last_loss:.5f} lr {lr_used:.3g} "
                          f"{steps_this_run / max(elapsed, 1e-9):.3f} it/s", flush=True)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                ckpt_path = save(step)
            if cfg.sample_every and step % cfg.sample_every == 0 and main and preview_batch is not None:
                write_preview(models, preview_batch, cfg.mode, cfg.sample_steps, cfg.only_mid_control, cfg.seed,
                              run_dir / "samples" / f"step-{step:08d}.png")
    bar.close()
    if steps_this_run and (not cfg.checkpoint_every or step % cfg.checkpoint_every != 0):
        ckpt_path = save(step)
    if main:
        logger.close()
        if skipped_total:
            print(f"warning: {skipped_total} bad examples were skipped (see the warnings above for their names)",
                  flush=True)
    return TrainResult(step, last_loss, run_dir, ckpt_path, skipped_total, losses,
                       ema.state_dict()["shadow"] if ema is not None else None)


def export_result(models: TrainModels, cfg: TrainConfig, path, use_ema: bool = True,
                  dtype: torch.dtype | None = None, checkpoint=None, metadata: dict | None = None) -> Path:
    """Write the trained model file; with ``use_ema`` and an EMA in ``checkpoint``, its weights."""
    overrides = {}
    if checkpoint is not None and use_ema:
        state = st.load_checkpoint(checkpoint) if not isinstance(checkpoint, dict) else checkpoint
        if state.get("ema"):
            shadow = state["ema"]["shadow"]
            for part, module in models.modules().items():
                own = module.state_dict()
                prefix = part + "."
                sub = {n[len(prefix):]: t for n, t in shadow.items() if n.startswith(prefix)}
                if sub:
                    overrides[part] = {k: sub.get(k, v) for k, v in own.items()}
    return export_models(models, path, cfg.mode, cfg.sd_locked, dtype, metadata, overrides)
