"""Sampler and schedule names as users type them (A1111's labels, its old combined names such as
"DPM++ 2M Karras", its ``k_*`` aliases, and our registry keys) -> (sampler key, schedule).

Parsing follows A1111 1.9+ (``sd_samplers.get_sampler_and_scheduler``): a name is a sampler
label, optionally followed by a schedule label ("DPM++ 2M SDE Karras"); case and runs of spaces
do not matter. A sampler without a schedule gets its default, which is A1111's "Automatic": the
sampler's own schedule where A1111 gives it one (Karras for DPM++ 2M and DPM++ SDE, Exponential
for DPM++ 2M SDE), else Uniform; DDIM keeps the original DDIM steps, UniPC SGM Uniform (the
spacing of diffusers' default), LCM the LCM authors' steps. "UniPC order 1" and the "Karras Min"
schedule (its default) are ours, not A1111's: the ``fast`` preset (``ctrlnet.generation.presets``).
"""

from __future__ import annotations

import re

from ctrlnet.sampling.registry import SAMPLERS
from ctrlnet.sampling.schedule import SCHEDULES

# key -> A1111 label (the name written in infotexts), in A1111's menu order
SAMPLER_LABELS: dict[str, str] = {
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
    "euler_a": "Euler a",
    "euler": "Euler",
    "lms": "LMS",
    "heun": "Heun",
    "lcm": "LCM",
    "ddim": "DDIM",
    "unipc": "UniPC",
    "unipc_1": "UniPC order 1",
}

# other spellings users and old infotexts use (A1111's aliases, ComfyUI's keys where they agree)
SAMPLER_ALIASES: dict[str, str] = {
    "k_euler_a": "euler_a", "k_euler_ancestral": "euler_a", "euler_ancestral": "euler_a", "euler ancestral": "euler_a",
    "k_euler": "euler", "k_lms": "lms", "k_heun": "heun", "k_dpmpp_2m": "dpmpp_2m", "k_dpmpp_sde": "dpmpp_sde",
    "k_dpmpp_2m_sde": "dpmpp_2m_sde", "k_dpmpp_2m_sde_heun": "dpmpp_2m_sde_heun", "k_lcm": "lcm",
}

# the old A1111 names with the schedule glued to the key
COMBINED_ALIASES: dict[str, tuple[str, str]] = {
    "k_dpmpp_2m_ka": ("dpmpp_2m", "karras"), "k_dpmpp_sde_ka": ("dpmpp_sde", "karras"),
    "k_dpmpp_2m_sde_ka": ("dpmpp_2m_sde", "karras"), "k_lms_ka": ("lms", "karras"),
}

# schedule key -> A1111 label
SCHEDULE_LABELS: dict[str, str] = {
    "uniform": "Uniform",
    "karras": "Karras",
    "karras_min": "Karras Min",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "ddim": "DDIM",
    "lcm": "LCM",
}
SCHEDULE_ALIASES: dict[str, str] = {"normal": "uniform"}  # ComfyUI's "normal" is the same spacing
AUTOMATIC = "automatic"

# Samplers whose bare A1111 label names one schedule in every A1111 version. Before 1.9 a bare
# "DPM++ 2M" meant Uniform; 1.9 made Karras its default, so that name is written with its schedule.
_LABEL_FIXES_SCHEDULE = {"euler_a": "uniform", "euler": "uniform", "lms": "uniform", "heun": "uniform",
                         "ddim": "ddim", "unipc": "sgm_uniform", "lcm": "lcm",
                         "unipc_1": "karras_min"}  # ours: no A1111 version has it


def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower())


def _sampler_table() -> dict[str, str]:
    table = {_norm(k): k for k in SAMPLERS}
    table.update({_norm(v): k for k, v in SAMPLER_LABELS.items()})
    table.update({_norm(a): k for a, k in SAMPLER_ALIASES.items()})
    return table


def _schedule_table() -> dict[str, str]:
    table = {_norm(k): k for k in SCHEDULES}
    table.update({_norm(v): k for k, v in SCHEDULE_LABELS.items()})
    table.update({_norm(a): k for a, k in SCHEDULE_ALIASES.items()})
    return table


def resolve_schedule(schedule: str | None) -> str | None:
    """A schedule key for a key, A1111 label or alias (any case); ``None`` or "Automatic" give
    ``None`` (the sampler's default). ValueError listing the known names otherwise."""
    if schedule is None or _norm(schedule) == AUTOMATIC:
        return None
    key = _schedule_table().get(_norm(schedule))
    if key is None:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(schedule_names())}")
    return key


def resolve_sampler(name: str, schedule: str | None = None) -> tuple[str, str]:
    """``(sampler key, schedule key)`` for a sampler name as users type it.

    The schedule is ``schedule`` if given (and not "Automatic"), else the one in the name
    ("DPM++ 2M Karras"), else the sampler's default. Raises ValueError naming the unknown sampler
    or schedule, with the accepted names.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"sampler must be a non-empty name, got {name!r}")
    explicit = resolve_schedule(schedule)
    n = _norm(name)
    samplers = _sampler_table()
    key, named = samplers.get(n), None
    if key is None and n in COMBINED_ALIASES:
        key, named = COMBINED_ALIASES[n]
    if key is None:
        # "<sampler> <schedule label>", longest schedule label first ("SGM Uniform" before "Uniform")
        for label, sched in sorted(_schedule_table().items(), key=lambda kv: -len(kv[0])):
            if n.endswith(" " + label) and n[: -len(label) - 1] in samplers:
                key, named = samplers[n[: -len(label) - 1]], sched
                break
    if key is None:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(sampler_names())}; a schedule may "
                         "follow the name as in A1111 (DPM++ 2M Karras) or be given on its own")
    return key, explicit or named or SAMPLERS[key].schedule


def a1111_name(sampler: str, schedule: str | None = None) -> str:
    """The A1111 name for infotexts: the sampler's label, with the schedule's label appended
    unless the bare label already means that schedule in every A1111 version ("Euler",
    "DDIM", "DPM++ 2M Karras", "Euler Karras"). ``resolve_sampler`` of the result gives
    ``(sampler, schedule)`` back. ValueError on unknown names."""
    key, sched = resolve_sampler(sampler, schedule)
    label = SAMPLER_LABELS[key]
    if _LABEL_FIXES_SCHEDULE.get(key) == sched:
        return label
    return f"{label} {SCHEDULE_LABELS[sched]}"


def sampler_names(with_schedules: bool = False) -> list[str]:
    """A1111 sampler labels for menus and API enums; with ``with_schedules``, also every
    "<sampler> <schedule>" combination (as old infotexts write them)."""
    names = list(SAMPLER_LABELS.values())
    if with_schedules:
        names += [f"{SAMPLER_LABELS[k]} {SCHEDULE_LABELS[s]}" for k in SAMPLER_LABELS for s in SCHEDULE_LABELS]
    return names


def schedule_names() -> list[str]:
    """A1111 schedule labels, "Automatic" first (= the sampler's default)."""
    return ["Automatic", *SCHEDULE_LABELS.values()]
