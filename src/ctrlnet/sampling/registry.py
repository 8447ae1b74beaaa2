"""The sampler registry: :data:`SAMPLERS` maps a key to a :class:`SamplerSpec` (the function from
:mod:`ctrlnet.sampling.samplers`, its options with defaults and limits, its default schedule);
:func:`run_sampler` is the one call for the pipeline: it applies the defaults, refuses unknown or
out-of-range options by name, and builds the noise sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ctrlnet.sampling.noise import NOISE_KINDS, Generators, make_noise_sampler
from ctrlnet.sampling.samplers import (
    Callback,
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
    sample_lms,
    sample_unipc,
    sample_unipc_1,
)


@dataclass(frozen=True)
class Option:
    """One sampler option: its default and what it accepts (``low``..``high`` for numbers,
    ``choices`` for strings)."""

    default: float | int | str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    help: str = ""

    def check(self, sampler: str, name: str, value):
        """Return ``value`` converted to the default's type; ValueError naming sampler and option."""
        where = f"sampler {sampler!r} option {name}={value!r}"
        if self.choices:
            if value not in self.choices:
                raise ValueError(f"{where} is not one of {', '.join(self.choices)}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number")
        if isinstance(self.default, int) and float(value) != int(value):
            raise ValueError(f"{where} must be a whole number")
        value = type(self.default)(value)
        if not (self.low <= value <= self.high):
            raise ValueError(f"{where} is out of range: must be between {self.low} and {self.high}")
        return value


_ETA = Option(1.0, 0.0, 1.0, help="ancestral noise: 0 deterministic, 1 the full SDE")
_S_NOISE = Option(1.0, 0.0, 2.0, help="scale of the added noise")


def _noise_option(default: str) -> Option:
    return Option(default, choices=NOISE_KINDS,
                  help="gaussian: fresh draws each step; brownian: one Brownian path (consistent across step counts)")


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler in the registry.

    ``fn``: the sampler function. ``options``: every option a caller may set, with defaults and
    limits (``noise`` is turned into the ``noise_sampler`` argument by :func:`run_sampler`).
    ``schedule``: the default schedule (A1111's "Automatic" for this sampler). ``calls_per_step``:
    model calls per step (2 for single-step second-order samplers, except the last step).
    """

    fn: Callable
    options: Mapping[str, Option] = field(default_factory=dict)
    schedule: str = "uniform"
    calls_per_step: int = 1
    description: str = ""

    @property
    def defaults(self) -> dict:
        return {k: o.default for k, o in self.options.items()}

    @property
    def stochastic(self) -> bool:
        return "noise" in self.options


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(sample_ddim, {"eta": Option(0.0, 0.0, 1.0, help=_ETA.help), "s_noise": _S_NOISE,
                                      "noise": _noise_option("gaussian")},
                        schedule="ddim", description="DDIM, as the original ControlNet apps (eta 0: deterministic)"),
    "euler": SamplerSpec(sample_euler, description="Euler on the probability-flow ODE"),
    "euler_a": SamplerSpec(sample_euler_ancestral,
                           {"eta": _ETA, "s_noise": _S_NOISE, "noise": _noise_option("gaussian")},
                           description="ancestral Euler (new noise every step)"),
    "heun": SamplerSpec(sample_heun, calls_per_step=2, description="Heun, second order"),
    "lms": SamplerSpec(sample_lms, {"order": Option(4, 1, 4, help="multistep order")},
                       description="linear multistep"),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, schedule="karras", description="DPM-Solver++(2M)"),
    "dpmpp_2m_sde": SamplerSpec(sample_dpmpp_2m_sde, {"eta": _ETA, "s_noise": _S_NOISE,
                                                      "solver_type": Option("midpoint", choices=("midpoint", "heun")),
                                                      "noise": _noise_option("brownian")},
                                schedule="exponential", description="DPM-Solver++(2M) SDE, midpoint"),
    "dpmpp_2m_sde_heun": SamplerSpec(sample_dpmpp_2m_sde, {"eta": _ETA, "s_noise": _S_NOISE,
                                                           "solver_type": Option("heun", choices=("midpoint", "heun")),
                                                           "noise": _noise_option("brownian")},
                                     schedule="exponential", description="DPM-Solver++(2M) SDE, Heun correction"),
    "dpmpp_sde": SamplerSpec(sample_dpmpp_sde, {"eta": _ETA, "s_noise": _S_NOISE,
                                                "r": Option(0.5, 0.01, 1.0, help="position of the intermediate step"),
                                                "noise": _noise_option("brownian")},
                             schedule="karras", calls_per_step=2, description="DPM-Solver++ SDE (single step)"),
    "unipc": SamplerSpec(sample_unipc, {"order": Option(2, 1, 3, help="predictor order"),
                                        "variant": Option("bh2", choices=("bh1", "bh2"))},
                         schedule="sgm_uniform", description="UniPC, as diffusers' UniPCMultistepScheduler"),
    "unipc_1": SamplerSpec(sample_unipc_1, {"variant": Option("bh2", choices=("bh1", "bh2"))},
                           schedule="karras_min",
                           description="UniPC order 1: DDIM steps each corrected by the next prediction"),
    "lcm": SamplerSpec(sample_lcm, {"noise": _noise_option("gaussian")}, schedule="lcm",
                       description="LCM (for LCM-distilled weights and LCM-LoRA)"),
}


def sampler_spec(key: str) -> SamplerSpec:
    """The registry entry for ``key``; ValueError listing the known keys."""
    try:
        return SAMPLERS[key]
    except KeyError:
        raise ValueError(f"unknown sampler {key!r}; known: {', '.join(SAMPLERS)}") from None


def get_sampler(key: str) -> Callable:
    """The bare sampler function for ``key`` (its keyword defaults are the registry's)."""
    return sampler_spec(key).fn


def check_options(key: str, options: Mapping) -> dict:
    """The sampler's defaults updated with ``options``, each checked; ValueError naming any option
    the sampler does not take (with the ones it does) or a value out of its range."""
    spec = sampler_spec(key)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        known = ", ".join(spec.options) or "none"
        raise ValueError(f"sampler {key!r} takes no option {', '.join(unknown)}; its options: {known}")
    out = spec.defaults
    for name, value in options.items():
        out[name] = spec.options[name].check(key, name, value)
    return out


def run_sampler(name: str, denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
                seed: int | Sequence[int] | None = None, callback: Callback | None = None,
                extra_args: dict | None = None, **options) -> torch.Tensor:
    """Sample ``x`` (B, C, h, w, sigma space, at ``sigmas[0]``) down ``sigmas`` with sampler
    ``name`` (a key of :data:`SAMPLERS` or any name :func:`ctrlnet.sampling.names.resolve_sampler`
    accepts; a schedule in the name is ignored here, the caller chose ``sigmas``).

    ``options`` override the sampler's defaults (e.g. ``eta``); an option the sampler does not
    take, or a value out of range, raises ValueError before any model call. ``generator``: one
    ``torch.Generator`` or one per batch item, for the noise of stochastic samplers. ``seed``:
    Brownian-tree seed(s) (an int, or one per item as A1111's image seeds); by default drawn from
    ``generator``. Returns the latent at ``sigmas[-1]``.
    """
    if name in SAMPLERS:
        key = name
    else:
        from ctrlnet.sampling.names import resolve_sampler

        key = resolve_sampler(name)[0]
    spec = SAMPLERS[key]
    opts = check_options(key, options)
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D list of at least 2 values, got shape {tuple(sigmas.shape)}")
    kind = opts.pop("noise", None)
    if kind is not None:
        opts["noise_sampler"] = make_noise_sampler(kind, x, sigmas, generator, seed)
    return spec.fn(denoiser, x, sigmas, extra_args=extra_args, callback=callback, **opts)
