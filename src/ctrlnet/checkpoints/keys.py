"""Comparing a state dict against a module's: the one diagnosis every loader reports."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def key_problems(expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor],
                 optional: tuple[str, ...] = (), harmless: tuple[str, ...] = ()) -> list[str]:
    """Missing, unexpected and mis-shaped keys, one summary line each (empty when ``sd`` fits).

    ``optional``: suffixes of expected keys a file may lack; ``harmless``: substrings of file keys
    to ignore.
    """
    missing = [k for k in expected if k not in sd and not k.endswith(optional)]
    unexpected = [k for k in sd if k not in expected and not any(h in k for h in harmless)]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:20])}")
    return problems
