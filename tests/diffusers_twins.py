"""diffusers twins of our tiny models (same weights), to use diffusers' pipelines as oracles.

Prompts go in as ``prompt_embeds`` from our text encoder, so no tokenizer is needed. diffusers'
img2img/inpaint pipelines sample the VAE posterior with the generator; we use its mean (as the
original v1.1 apps), so ``posterior_mean`` patches their ``retrieve_latents`` to ``argmax``.
"""

from __future__ import annotations

import contextlib

import numpy as np
from PIL import Image

from ctrlnet.checkpoints import diffusers_unet as du
from ctrlnet.checkpoints.diffusers_vae import diffusers_vae_config, vae_to_diffusers


def _strip(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def unet_twin(unet, params: dict):
    import diffusers

    theirs = diffusers.UNet2DConditionModel(**_strip(du.diffusers_config(params))).eval()
    theirs.load_state_dict(du.to_diffusers(unet.state_dict(), params), strict=True)
    return theirs


def controlnet_twin(net, params: dict):
    import diffusers

    theirs = diffusers.ControlNetModel(**_strip(du.diffusers_config(params, "controlnet"))).eval()
    theirs.load_state_dict(du.to_diffusers(net.state_dict(), params, "controlnet"), strict=True)
    return theirs


def vae_twin(vae, cfg):
    import diffusers

    theirs = diffusers.AutoencoderKL(**{**_strip(diffusers_vae_config(cfg)), "scaling_factor": vae.scale_factor}).eval()
    theirs.load_state_dict(vae_to_diffusers(vae.state_dict()), strict=True)
    return theirs


def ddim_scheduler(schedule_cfg):
    import diffusers

    return diffusers.DDIMScheduler(
        num_train_timesteps=schedule_cfg.timesteps, beta_start=schedule_cfg.linear_start,
        beta_end=schedule_cfg.linear_end, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
        prediction_type="v_prediction" if schedule_cfg.parameterization == "v" else "epsilon",
    )


def pipeline(cls, models, controlnet_name: str):
    """A diffusers pipeline of class ``cls`` on twins of ``models`` (no text encoder or tokenizer)."""
    cfg = models.config
    net = models.controlnets[controlnet_name]
    return cls(
        vae=vae_twin(models.base.vae, cfg.vae), text_encoder=None, tokenizer=None,
        unet=unet_twin(models.base.unet, models.base.unet._params),
        controlnet=controlnet_twin(net, net._params),
        scheduler=ddim_scheduler(cfg.schedule), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


@contextlib.contextmanager
def posterior_mean(module):
    """Make ``module``'s ``retrieve_latents`` take the posterior mean (and leave the generator alone)."""
    real = module.retrieve_latents

    def mean(encoder_output, generator=None, sample_mode="sample"):
        return real(encoder_output, generator, sample_mode="argmax")

    module.retrieve_latents = mean
    try:
        yield
    finally:
        module.retrieve_latents = real


def to_uint8(images: np.ndarray) -> np.ndarray:
    """diffusers' ``output_type="np"`` floats in [0, 1] -> uint8, truncating like our decode."""
    return (images * 255.0).clip(0, 255).astype(np.uint8)


def pil(x: np.ndarray) -> Image.Image:
    return Image.fromarray(x)
