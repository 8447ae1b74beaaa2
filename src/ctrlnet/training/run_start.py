"""How a training run starts in its folder: fresh, resumed, or over an earlier run moved aside.

:func:`plan_run` decides, reading only, so every refusal comes before the data and the models
load (the command line calls it first); :meth:`RunStart.begin` then carries the plan out on the
main process (renames, temp-file removal), and the loop loads the chosen checkpoint. The folder
rules are :mod:`ctrlnet.training.run_folder`'s; the checkpoint files are
:mod:`ctrlnet.training.state`'s.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ctrlnet.training import state as st
from ctrlnet.training.data import dataset_record
from ctrlnet.training.logger import read_loss_csv
from ctrlnet.training.resume_settings import ResumeRefused, resume_input_changes, resume_setting_changes
from ctrlnet.training.run_folder import OutputClaim, OutputInUse, check_output, is_inside, set_aside

if TYPE_CHECKING:
    from ctrlnet.training.loop import TrainConfig


def run_holds(run_dir) -> list[str]:
    """The earlier training work in ``run_dir``, in words (empty: a fresh start loses nothing)."""
    run_dir = Path(run_dir)
    holds = []
    steps = [s for s, _ in st.list_checkpoints(run_dir / "checkpoints")]
    if steps:
        shown = ", ".join(map(str, steps)) if len(steps) <= 6 else f"{steps[0]} to {steps[-1]} ({len(steps)} files)"
        holds.append(f"checkpoints at steps {shown}")
    aside = st.set_aside_checkpoints(run_dir / "checkpoints")
    if aside:
        holds.append("set-aside checkpoints " + ", ".join(p.name for p in aside))
    csv_path = run_dir / "loss.csv"
    if csv_path.is_file():
        rows = read_loss_csv(csv_path)
        if rows:
            holds.append(f"loss.csv with {len(rows)} steps")
    return holds


@dataclass
class RunStart:
    """How a run starts in its folder, decided by :func:`plan_run` before any work (it only reads)
    and carried out by :meth:`begin` on the main process (renames, temp-file removal)."""

    run_dir: Path
    output: OutputClaim
    checkpoint: Path | None = None  # the checkpoint resumed from
    state: dict | None = None  # its contents
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # set aside as .unreadable
    superseded: list[Path] = field(default_factory=list)  # newer than the one resumed from
    export: OutputClaim | None = None  # an earlier export file outside the run folder
    notes: list[str] = field(default_factory=list)

    def begin(self) -> list[str]:
        """Carry out the plan; returns what was done, one sentence each."""
        notes = self.output.apply()
        if self.export is not None:
            notes += self.export.apply()
        for path, why in self.unreadable:
            dest = set_aside(path, "unreadable")
            notes.append(f"set aside {path.name} as {dest.name}: {why}")
        for path in self.superseded:
            dest = set_aside(path, "superseded")
            notes.append(f"set aside {path.name} as {dest.name}: it is newer than {self.checkpoint.name}, "
                         "which this run continues")
        return notes + self.notes

    def check_models(self, models) -> None:
        """Raise :class:`ResumeRefused` when the checkpoint resumed from was trained with other
        models (another base layout, another preset: its recorded ``model_config``), naming up to
        four differences; nothing for a fresh run or a checkpoint without that record."""
        recorded = self.state.get("model_config") if self.state is not None else None
        if not recorded:
            return

        def flat(d, prefix=""):
            out = {}
            for k, v in d.items():
                if isinstance(v, dict):
                    out.update(flat(v, f"{prefix}{k}."))
                elif k != "name" or prefix:
                    out[prefix + k] = list(v) if isinstance(v, tuple) else v
            return out

        a, b = flat(recorded), flat(asdict(models.config))
        diff = [f"{k} is {b.get(k)!r} but the checkpoint's is {a.get(k)!r}" for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)]
        if diff:
            raise ResumeRefused(f"cannot resume from {self.checkpoint}: the models differ from the ones it was "
                                f"trained with ({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}); "
                                "build them from the same files as the first run")

    def check_inputs(self, now: dict) -> None:
        """Raise :class:`ResumeRefused` when the run resumes a checkpoint whose recorded inputs
        (``state["inputs"]``: the data set's record, the frozen weights' fingerprint) differ from
        ``now`` in any key both have, naming each; nothing for a fresh run or an older checkpoint."""
        if self.state is None:
            return
        changed = resume_input_changes(self.state.get("inputs"), now)
        if changed:
            raise ResumeRefused(f"cannot resume from {self.checkpoint}: " + "; ".join(changed)
                                + ". Resume with the first run's data, --resolution, --invert-source and --base, "
                                "or start a new run (--overwrite, or another --out)")


def plan_run(run_dir, cfg: TrainConfig, resume: bool | str | Path = False, overwrite: bool = False,
             inputs=(), export=None) -> RunStart:
    """Decide how a run starts in ``run_dir``, reading only; every refusal happens here, before
    models load.

    - fresh (``resume=False``): ``run_dir`` must hold no earlier run (checkpoints, set-aside
      checkpoints, loss.csv rows), unless ``overwrite``, which moves it aside
      (:func:`~ctrlnet.training.run_folder.move_aside`), as it does an existing ``export`` file.
    - ``resume=True``: from the newest checkpoint that loads; newer ones that do not are set aside
      as ``.unreadable``; if checkpoints exist and none loads, refused, naming each; with no
      checkpoint at all, from step 0.
    - ``resume=FILE``: that file must exist and load (:func:`~ctrlnet.training.state.load_checkpoint`);
      checkpoints of the folder newer than it are set aside as ``.superseded``. A file outside
      ``run_dir`` may only start a fresh folder (or one moved aside with ``overwrite``).
    - resumed settings (:mod:`ctrlnet.training.resume_settings`): the applied ones are noted, the
      refused ones raise :class:`~ctrlnet.training.resume_settings.ResumeRefused` naming each
      setting and both values.

    ``inputs`` (data, model files) may not lie inside what ``overwrite`` would move;
    ``export`` is the model file the run writes at the end.

    Raises :class:`~ctrlnet.training.run_folder.OutputInUse`, ``ResumeRefused`` or
    :class:`~ctrlnet.checkpoints.io.CheckpointError` (all ``ValueError``), one line each.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    holds = run_holds(run_dir)
    if export is not None and is_inside(export, run_dir) and Path(export).is_file():
        holds.append(f"the exported model {Path(export).name}")
    resume_file = Path(resume) if isinstance(resume, (str, Path)) and str(resume) else None
    in_run = resume_file is not None and is_inside(resume_file, run_dir)
    if resume_file is not None:
        state = st.load_checkpoint(resume_file)  # missing, unreadable: one line naming the file
        if holds and not in_run and not overwrite:
            raise OutputInUse(f"{run_dir} holds an earlier training run ({'; '.join(holds)}); resuming from "
                              f"{resume_file}, which is not part of it, would mix the two: pass --overwrite to move "
                              "it aside first, or choose another --out")
    resuming = resume is True or in_run
    output = check_output(run_dir, resume=resuming, overwrite=overwrite, holds=holds, kind="training run",
                          inputs=[*inputs, resume_file])
    start = RunStart(run_dir, output)
    if export is not None and not is_inside(export, run_dir):  # (one inside goes with the folder)
        export = Path(export)
        holds_file = [f"a model file of {export.stat().st_size / 2**20:.1f} MiB"] if export.is_file() else []
        # resuming, the run's own export is replaced at the end; a fresh run may not replace one
        start.export = check_output(export, resume=resuming, overwrite=overwrite, is_dir=False,
                                    holds=[] if resuming else holds_file, kind="exported model", inputs=inputs)
    if resume_file is not None:
        start.checkpoint, start.state = resume_file, state
        if in_run:
            start.superseded = [p for s, p in st.list_checkpoints(ckpt_dir) if s > state["step"]]
    elif resume is True:
        found, unreadable = st.find_resume_point(ckpt_dir)
        if found is None and (unreadable or st.set_aside_checkpoints(ckpt_dir)):
            why = [w for _, w in unreadable] + [f"{p} (set aside earlier)" for p in st.set_aside_checkpoints(ckpt_dir)]
            raise OutputInUse(f"cannot resume {run_dir}: no checkpoint there loads: {'; '.join(why)}. Nothing was "
                              "changed; pass --resume-from a good checkpoint, or --overwrite to move this run aside "
                              "and start over")
        start.unreadable = unreadable
        if found is None:
            start.notes.append(f"no checkpoint in {ckpt_dir} yet: starting at step 0")
        else:
            start.checkpoint, start.state = found
    if start.state is not None:
        applied, refused = resume_setting_changes(start.state.get("train_config"), cfg)
        if refused:
            raise ResumeRefused(f"cannot resume from {start.checkpoint}: " + "; ".join(refused)
                                + ". These cannot change mid-run: use the checkpoint's values, or start a new run "
                                "(--overwrite, or another --out)")
        start.notes += applied
    return start


def run_inputs(dataset, models, trainable: dict) -> dict:
    """What a checkpoint records of the run's inputs (``state["inputs"]``, compared on resume by
    :meth:`RunStart.check_inputs`): the data set's record (:func:`~ctrlnet.training.data.dataset_record`)
    and ``frozen_weights``, the fingerprint of every parameter of ``models`` not in ``trainable``."""
    trained = {id(p) for p in trainable.values()}
    inputs = dict(dataset_record(dataset) or {})
    inputs["frozen_weights"] = frozen_fingerprint(
        (f"{k}.{n}", p) for k, m in models.modules().items() for n, p in m.named_parameters() if id(p) not in trained)
    return inputs


def frozen_fingerprint(named_tensors) -> str:
    """A SHA-256 over the frozen weights' names, shapes and first and last 256 values (as fp32):
    enough to tell two trained models apart (their weights differ everywhere) without reading
    gigabytes. ``named_tensors``: (name, tensor) pairs, in any order."""
    h = hashlib.sha256()
    for name, t in sorted(named_tensors, key=lambda nt: nt[0]):
        flat = t.detach().reshape(-1)
        ends = flat[:256] if flat.numel() <= 512 else flat[[*range(256), *range(flat.numel() - 256, flat.numel())]]
        h.update(f"{name}:{tuple(t.shape)}:".encode())
        h.update(ends.float().cpu().numpy().tobytes())
    return h.hexdigest()
