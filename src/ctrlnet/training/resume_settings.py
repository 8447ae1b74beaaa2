"""Which training settings may differ from the checkpoint's when a run resumes.

Applied settings take effect from the first resumed step (the loop sets a new learning rate in
the optimizer and its schedule, and loss.csv's ``lr`` column shows it); refused ones would turn the
continuation into a different run than the checkpoint's (data order, noise, what trains, the
numerics), so the run stops before any work, naming each setting with both values. Every field of
:class:`~ctrlnet.training.loop.TrainConfig` is in exactly one of the two tables (a test checks).
This module imports nothing heavy: the command line's ``--help`` reads it.
"""

from __future__ import annotations

import textwrap
from dataclasses import asdict, is_dataclass


# setting -> what changes when it is applied
APPLIED_ON_RESUME = {
    "steps": "the run stops at the new total (a cosine decay follows it from the resumed step)",
    "lr": "the optimizer and the schedule use it from the next step (loss.csv's lr column shows it)",
    "weight_decay": "the optimizer uses it from the next step",
    "warmup_steps": "the schedule is recomputed at the resumed step",
    "lr_decay": "the schedule is recomputed at the resumed step",
    "max_grad_norm": "from the next step",
    "prompt_dropout": "from the next step",
    "kl_weight": "from the next step",
    "sample_latents": "from the next step",
    "gradient_checkpointing": "same arithmetic, less memory",
    "checkpoint_every": "", "keep_last": "", "keep_every": "", "sample_every": "", "sample_steps": "",
    "sample_count": "", "log_every": "", "num_workers": "", "progress": "", "cpu": "",
}
# setting -> what it would change, the reason it is refused
REFUSED_ON_RESUME = {
    "mode": "what trains", "sd_locked": "what trains", "only_mid_control": "what trains",
    "train_text": "what trains", "train_encoder": "what trains",
    "batch_size": "the data order", "grad_accum": "the data order", "seed": "the data order and noise",
    "mixed_precision": "the numerics and the grad scaler", "ema_decay": "the EMA's averaging",
}

# what a checkpoint records of the run's inputs (``state["inputs"]``) -> what a change would mean;
# every difference is refused, as the settings of REFUSED_ON_RESUME are
RECORDED_INPUTS = {
    "examples": "the data set has other examples (the data order)",
    "rows_sha256": "the data set's rows (image files and prompts) differ",
    "resolution": "the images are resized to another --resolution",
    "invert_source": "the control images are inverted differently (--invert-source)",
    "random_crop": "the crops differ", "crop_size": "the crops differ",
    "frozen_weights": "the frozen weights differ: another --base (or VAE, text encoder) than the run's",
}


def resume_settings_help(flags: dict[str, str] | None = None, width: int = 100) -> str:
    """The resume rules in words, for ``--help``; ``flags`` maps setting names to the option that
    sets them (settings without an option are left out)."""

    def names(table):
        return ", ".join(flags[k] if flags else k for k in table if flags is None or k in flags)

    def para(title, table):
        return textwrap.fill(f"{title}: {names(table)}", width, initial_indent="  ", subsequent_indent="    ",
                             break_on_hyphens=False)

    return "\n".join(["settings on resume, when they differ from the checkpoint's:",
                      para("applied from the next step", APPLIED_ON_RESUME),
                      para("refused (the run stops, naming the setting and both values)", REFUSED_ON_RESUME),
                      textwrap.fill("  also refused: other training data (its examples, --resolution, "
                                    "--invert-source) or another --base than the checkpoint's", width,
                                    subsequent_indent="    ")])


class ResumeRefused(ValueError):
    """A resume whose settings (or models) differ from the checkpoint's in a way that cannot apply."""


def resume_setting_changes(recorded: dict | None, cfg) -> tuple[list[str], list[str]]:
    """(applied, refused): one sentence per setting of ``cfg`` that differs from ``recorded``
    (the checkpoint's ``train_config``)."""
    if not recorded:
        return [], []
    applied, refused = [], []
    now = asdict(cfg) if is_dataclass(cfg) else dict(cfg)
    for k in now:
        if k not in recorded or recorded[k] == now[k]:
            continue
        if k in REFUSED_ON_RESUME:
            refused.append(f"{k} is {now[k]!r} but the checkpoint's is {recorded[k]!r} "
                           f"(it would change {REFUSED_ON_RESUME[k]})")
        else:
            applied.append(f"{k}: {now[k]!r} (the checkpoint's was {recorded[k]!r}), applied")
    return applied, refused


def resume_input_changes(recorded: dict | None, now: dict) -> list[str]:
    """One sentence per recorded input of the run (``now``: :meth:`PairDataset.record`'s keys and
    ``frozen_weights``) that differs from the checkpoint's ``inputs``; none for a checkpoint that
    recorded none (written before inputs were recorded)."""
    if not recorded:
        return []
    out = []
    for k, v in now.items():
        if k in recorded and recorded[k] != v:
            shown = (lambda x: f"{x[:12]}..." if isinstance(x, str) and len(x) == 64 else repr(x))
            out.append(f"{RECORDED_INPUTS.get(k, k)} ({k}: now {shown(v)}, the checkpoint's {shown(recorded[k])})")
    return out
