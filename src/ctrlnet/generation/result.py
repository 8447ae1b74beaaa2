"""What generate() returns, and the record that makes each image again (A1111 ``parameters``
infotext and our JSON)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np

from ctrlnet.generation.request import GenerationRequest


# sd-webui-controlnet's HiResFixOption values, as its infotexts write them
_HR_LABELS = {"both": "Both", "low_res_only": "Low res only", "high_res_only": "High res only"}


@dataclass
class GenerationResult:
    """``images``: (H, W, 3) uint8 each; ``control_maps``: the maps used, (H, W, C) uint8, one per unit
    (at the last pass's size); ``seed``: the batch's seed (image k used ``seeds[k]``);
    ``request``: the request with the seed and prompts actually used; ``interrupted_at``: for the
    partial answer of a cancelled run, the steps finished (over all passes) when it stopped;
    ``size``: (H, W) of the first pass, the ``Size`` A1111 records (the images are larger after a
    hires pass, and have the original's size after only-masked inpainting); None: the images'."""

    images: list[np.ndarray]
    control_maps: list[np.ndarray]
    seed: int
    request: GenerationRequest
    seeds: list[int] = field(default_factory=list)
    interrupted_at: int | None = None
    size: tuple[int, int] | None = None

    def __post_init__(self):
        if not self.seeds:
            self.seeds = [self.seed + k for k in range(len(self.images))]

    def image_request(self, k: int) -> GenerationRequest:
        """The request that makes image ``k`` alone (its own seed, one image)."""
        return replace(self.request, seed=self.seeds[k], num_images=1)

    def parameters_text(self, model_name: str = "", k: int = 0, model_hash: str = "") -> str:
        """An A1111-style ``parameters`` string for image ``k``: prompt, negative prompt, settings
        (``Model hash: ..., Model: ...`` when given, in A1111's order)."""
        r = self.request
        h, w = self.size or self.images[k].shape[:2]
        prompt = r.prompt + (f", {r.added_prompt}" if r.added_prompt else "")
        from ctrlnet.sampling.names import a1111_name

        settings = [f"Steps: {r.steps}", f"Sampler: {a1111_name(r.sampler, r.schedule)}",
                    f"CFG scale: {r.guidance_scale}", f"Seed: {self.seeds[k]}", f"Size: {w}x{h}"]
        if r.eta is not None:
            settings.append(f"Eta: {r.eta}")
        if model_hash:
            settings.append(f"Model hash: {model_hash}")
        if model_name:
            settings.append(f"Model: {model_name}")
        if r.init_image is not None:
            settings.append(f"Denoising strength: {r.denoising_strength}")
        if r.mask is not None:
            settings.append(f"Mask blur: {r.mask_blur}")
        if r.hires_scale > 1:
            settings += [f"Hires upscale: {r.hires_scale}", f"Hires steps: {r.hires_steps}",
                         f"Hires upscaler: {r.hires_upscaler.value}"]
            if r.init_image is None:
                settings.insert(-3, f"Denoising strength: {r.hires_denoising_strength}")
        for i, c in enumerate(r.controls):
            settings.append(f"ControlNet {i}: \"Module: {c.annotator or 'none'}, Model: {c.model or 'default'}, "
                            f"Weight: {c.strength}, Resize Mode: {c.resize_mode.value}, "
                            f"Guidance Start: {c.start}, Guidance End: {c.end}, Pixel Perfect: {c.pixel_perfect}, "
                            f"Control Mode: {c.mode(r.guess_mode).value}, "
                            f"Hr Option: {_HR_LABELS[c.hr_option.value]}\"")
        for name, wt in r.loras:
            settings.append(f"Lora: {name}:{wt}")
        return f"{prompt}\nNegative prompt: {r.negative_prompt or ''}\n" + ", ".join(settings)


def result_metadata(result: GenerationResult, model_name: str = "", k: int = 0) -> dict[str, str]:
    """PNG text chunks for image ``k``: A1111 ``parameters`` and our JSON ``ctrlnet`` (its own seed)."""
    return {"parameters": result.parameters_text(model_name, k),
            "ctrlnet": json.dumps({"request": result.image_request(k).to_dict(), "model": model_name})}
