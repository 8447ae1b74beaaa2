"""Named sampling presets: a sampler, its schedule and a step count, filled in where a caller left
them unset.

A preset is plain data, applied to the request's settings before the model's defaults
(:func:`ctrlnet.interfaces.request_io.with_model_defaults`, ``ctrlnet generate --preset``): what
the caller sets explicitly always wins. The schedule belongs to the preset's sampler, so a caller
who names another sampler gets that sampler's own schedule (unless they name one too) and only the
preset's step count.

``fast`` was chosen by ``benchmarks/few_steps.py`` (the table in the README): 10 steps of UniPC
order 1 on the Karras Min schedule (DDIM steps each corrected by the next prediction, Karras
spacing at rho 3 ending at the first training sigma as DDIM does) is the 10-step setting closest
to a 50-step DDIM image of the same seed on the embedded demo model: mean error 0.72 levels over 50
pairs, against 2.86 for 10 Euler steps (the preset before it), though not as close as 20 DDIM steps
(0.59).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# The request fields a preset decides.
PRESET_FIELDS = ("sampler", "schedule", "steps")


@dataclass(frozen=True)
class SamplingPreset:
    """``sampler`` (a name :func:`ctrlnet.sampling.names.resolve_sampler` takes), ``schedule``
    (None: the sampler's default) and ``steps``; ``summary`` says what it is for."""

    sampler: str
    schedule: str | None
    steps: int
    summary: str = ""


PRESETS: dict[str, SamplingPreset] = {
    "fast": SamplingPreset("UniPC order 1", "karras_min", 10,
                           "10 steps of UniPC order 1 on the Karras Min schedule: the 10-step setting nearest "
                           "a 50-step DDIM image (benchmarks/few_steps.py)"),
}


def get_preset(name: str) -> SamplingPreset:
    """The preset called ``name`` (case-insensitive); ValueError listing the known names."""
    preset = PRESETS.get(name.strip().lower()) if isinstance(name, str) else None
    if preset is None:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return preset


def apply_preset(settings: Mapping, name: str | None) -> dict:
    """A copy of ``settings`` (a request dict, or just its sampler/schedule/steps) with the preset's
    sampler, schedule and steps where ``settings`` has them missing or None; ``name`` None returns
    the copy unchanged. The preset's schedule is used only with the preset's sampler."""
    out = dict(settings)
    if name is None:
        return out
    preset = get_preset(name)
    if out.get("sampler") is None:
        out["sampler"] = preset.sampler
        if out.get("schedule") is None:
            out["schedule"] = preset.schedule
    if out.get("steps") is None:
        out["steps"] = preset.steps
    return out
