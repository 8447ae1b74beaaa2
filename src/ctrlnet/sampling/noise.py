"""Noise for samplers: seeded standard-normal draws shaped like the latent batch, and the
per-step noise samplers of stochastic samplers (fresh Gaussian draws, or k-diffusion's Brownian
tree).

A noise sampler is a callable ``(sigma, sigma_next) -> Tensor`` giving unit-variance noise shaped
like the latent for the step from ``sigma`` to ``sigma_next`` (k-diffusion's convention, which
ComfyUI and A1111 share).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None
NoiseSampler = Callable[[float, float], torch.Tensor]
NOISE_KINDS = ("gaussian", "brownian")


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` (B, ...), cast to ``x``'s dtype and device.

    ``generator`` is one of:

    - ``None``: torch's global RNG on ``x``'s device;
    - one ``torch.Generator``: the whole batch in one float32 draw on the generator's device, as
      ``torch.randn(x.shape, generator=g)`` (diffusers' ``randn_tensor`` and the original apps);
    - a sequence of B generators: item k drawn alone from generator k with shape ``x.shape[1:]``,
      so image k of a batch equals the same image made alone with generator k (diffusers' list of
      generators, A1111's per-image seeds).

    Raises ValueError when a sequence's length is not the batch size.
    """
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32).to(x)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(f"{len(gens)} generators for a batch of {x.shape[0]}; give one per item")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=torch.float32)
                        for g in gens]).to(x)


class GaussianNoise:
    """Fresh independent noise at every call (k-diffusion's ``default_noise_sampler``), drawn from
    ``generator`` as :func:`randn_like` does; the step's sigmas are ignored."""

    def __init__(self, x: torch.Tensor, generator: Generators = None):
        self.x = x
        self.generator = generator

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        return randn_like(self.x, self.generator)


class BrownianTreeNoise:
    """Increments of one Brownian motion W(sigma), normalised to unit variance:
    ``(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)`` (k-diffusion's
    ``BrownianTreeNoiseSampler``, used by A1111, ComfyUI and diffusers' ``DPMSolverSDEScheduler``
    for the DPM++ SDE samplers).

    The path depends only on the seed, not on which steps query it, so the same seed gives a
    consistent image as the step count changes. ``seed``: one int (one tree for the whole batch,
    as k-diffusion with one seed) or one int per batch item (A1111's per-image seeds: image k of a
    batch equals the image made alone with seed k). The trees are torchsde ``BrownianInterval``s
    with k-diffusion's settings (tol 1e-6, pool 24, halfway tree), built on the CPU in float32 as
    ComfyUI does so the noise does not depend on the device; the result is cast to ``x``.

    Raises ImportError naming torchsde when it is missing, ValueError on a bad interval or a seed
    list whose length is not the batch size.
    """

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seed: int | Sequence[int]):
        try:
            import torchsde
        except ImportError as e:  # a dependency of the package; only a broken install lacks it
            raise ImportError("Brownian-tree noise needs the torchsde package (pip install torchsde)") from e
        sigma_min, sigma_max = float(sigma_min), float(sigma_max)
        if not 0 <= sigma_min <= sigma_max:
            raise ValueError(f"Brownian tree needs 0 <= sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
        self.batched = not isinstance(seed, int)
        seeds = [int(s) for s in seed] if self.batched else [int(seed)]
        if self.batched and len(seeds) != x.shape[0]:
            raise ValueError(f"{len(seeds)} Brownian seeds for a batch of {x.shape[0]}; give one per item")
        size = tuple(x.shape[1:]) if self.batched else tuple(x.shape)
        self.x = x
        # torchsde rounds times to its tolerance (6 decimals); queries are clamped to the rounded
        # ends (torchsde would clamp too, with a warning, when a float64 sigma_max rounds down)
        self.t0, self.t1 = round(sigma_min, 6), round(sigma_max, 6)
        self._make = lambda: [torchsde.BrownianInterval(
            t0=sigma_min, t1=sigma_max, size=size, dtype=torch.float32, device=torch.device("cpu"), entropy=s,
            tol=1e-6, pool_size=24, halfway_tree=True) for s in seeds]
        self.trees = None  # built at the first query: a one-step run to sigma 0 never asks (min == max)

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        a, b = float(sigma), float(sigma_next)
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        # clamp rounding just outside the interval (a midpoint sigma computed in float64)
        lo, hi = max(lo, self.t0), min(hi, self.t1)
        if self.trees is None:
            self.trees = self._make()
        w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        w = w if self.batched else w[0]
        return (w / abs(b - a) ** 0.5).to(self.x)


def seeds_from(generator: Generators, batch: int) -> int | list[int]:
    """Brownian-tree seeds drawn from ``generator``: one int for ``None`` or one generator, one
    per item for a sequence of generators (so per-image generators give per-image trees)."""
    def draw(g):
        return int(torch.randint(0, 2**63 - 1, (1,), generator=g, device=g.device if g else None))
    if generator is None or isinstance(generator, torch.Generator):
        return draw(generator)
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"{len(gens)} generators for a batch of {batch}; give one per item")
    return [draw(g) for g in gens]


def make_noise_sampler(kind: str, x: torch.Tensor, sigmas: torch.Tensor, generator: Generators = None,
                       seed: int | Sequence[int] | None = None) -> NoiseSampler:
    """The noise sampler of ``kind`` ("gaussian" or "brownian") for sampling ``x`` along ``sigmas``.

    Brownian trees span ``[min(sigmas > 0), max(sigmas)]`` as k-diffusion's samplers set them up;
    their seed is ``seed`` if given (A1111 passes the image seeds, ComfyUI the noise seed), else
    drawn from ``generator`` by :func:`seeds_from`. Raises ValueError on an unknown kind.
    """
    if kind == "gaussian":
        return GaussianNoise(x, generator)
    if kind == "brownian":
        s = sigmas.detach().double().cpu()
        positive = s[s > 0]
        if len(positive) == 0:
            raise ValueError("Brownian noise needs at least one positive sigma")
        if seed is None:
            seed = seeds_from(generator, x.shape[0])
        return BrownianTreeNoise(x, float(positive.min()), float(s.max()), seed)
    raise ValueError(f"unknown noise kind {kind!r}; use one of {', '.join(NOISE_KINDS)}")
