"""Scoped weight patches: LoRA updates merged into the weights for the span of a ``with`` block.

The patch adds ``weight * delta`` to each touched parameter in fp32 and writes the sum back in the
parameter's own dtype, in place (so module references, devices and channels-last layouts stay);
a copy of every touched parameter is kept and copied back on exit, so the weights afterwards are
bit-for-bit the ones before (``torch.equal``), also when the block raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ctrlnet.checkpoints.lora import LoRAFile, LoRAError, load_lora, resolve


def _param(module: nn.Module, name: str) -> nn.Parameter:
    return module.get_parameter(name)


@contextmanager
def apply_loras(unet: nn.Module | None, text_encoder: nn.Module | None,
                controlnets: Mapping[str, nn.Module] | None,
                loras: Sequence[tuple[str | Path | LoRAFile, float]]) -> Iterator[list[LoRAFile]]:
    """Merge ``loras`` (``[(path or LoRAFile, weight), ...]``) into the given modules for the block.

    Each LoRA layer adds ``weight * alpha / rank * up @ down`` to the weight it names (A1111's and
    diffusers' ``fuse_lora`` arithmetic); several LoRAs on one weight are summed in fp32 first.
    A weight of 0 leaves the modules untouched. Yields the parsed files. Every file is read and
    matched before any weight changes, so a bad file (:class:`LoRAError` naming its unknown
    layers) leaves the models as they were. On exit the original tensors are restored exactly.
    """
    files = [(f if isinstance(f, LoRAFile) else load_lora(f), float(w)) for f, w in loras]
    modules = {"unet": unet, "text": text_encoder, "controlnet": dict(controlnets or {})}
    deltas: dict[int, tuple[nn.Parameter, dict[tuple[int, int] | None, torch.Tensor]]] = {}
    for lora, weight in files:
        for module, target, layer in resolve(lora, modules):
            if weight == 0.0:
                continue
            p = _param(module, target.param)
            shape = p.shape if target.rows is None else (target.rows[1] - target.rows[0], *p.shape[1:])
            d = layer.delta(torch.Size(shape), device=p.device) * weight  # fp32
            slot = deltas.setdefault(id(p), (p, {}))[1]
            slot[target.rows] = slot[target.rows] + d if target.rows in slot else d
    backups = [(p, p.detach().clone()) for p, _ in deltas.values()]
    try:
        with torch.no_grad():
            for p, by_rows in deltas.values():
                for rows, d in by_rows.items():
                    view = p if rows is None else p[rows[0]:rows[1]]
                    view.copy_((view.float() + d).to(p.dtype))
        yield [f for f, _ in files]
    finally:
        with torch.no_grad():
            for p, saved in backups:
                p.copy_(saved)


__all__ = ["apply_loras", "LoRAError"]
