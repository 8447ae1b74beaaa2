"""Result files that remember how they were made, and reading that record back.

Each image PNG carries two text chunks (from :func:`ctrlnet.pipeline.result_metadata`):
``parameters`` (A1111 style) and ``ctrlnet`` (JSON). We extend the JSON with what a rerun needs:

- ``request``: the request with the seed used and the resolved prompts (control images left out);
- ``base`` / ``controlnets``: the model specs (paths made absolute, ``random:...``, or ``demo``);
- ``control_maps``: file names, next to the image, of the control maps that were used;
- ``control_sources``: with hires fix, for each unit (but the inpaint one), the file name of its
  control image (``null``: the unit used the init image), made into its maps again on rerun;
- ``references``: for controls with a colour reference (reference colorization), the control's
  index and the file name of its reference image;
- ``dtype``: the weights' dtype.

``ctrlnet generate --from-png`` feeds the saved control maps back as ready-made maps (no annotator
runs again, so annotator weights are not needed) with the recorded seed and settings; on the same
device and dtype this gives the same pixels. With hires fix one saved map cannot stand for an
annotated unit: its annotator's output is fitted to each pass's size (sd-webui-controlnet's
hires hint), so a map saved at one pass's size, resized to the other's, is another hint (a canny
map made at 64 px and the one saved at 128 px differed by up to 65 levels in the image). With
hires fix the units' control images are saved too, and their maps made again (:func:`source_units`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctrlnet.image import ImageError, load_image, save_image
from ctrlnet.pipeline import GenerationRequest, GenerationResult, result_metadata

RECORD_KEY = "ctrlnet"


@dataclass
class SavedResult:
    images: list[Path]
    control_maps: list[Path]
    inputs: list[Path] = field(default_factory=list)  # the init image and mask saved next to them


@dataclass
class Record:
    """What a PNG's ``ctrlnet`` chunk says, with its control maps loaded."""

    request: GenerationRequest
    base: str | None
    controlnets: dict[str, str]
    dtype: str | None
    vae: str | None = None
    embeddings: list[str] = ()
    lora_dirs: list[str] = ()


def source_units(req: GenerationRequest) -> list[int]:
    """The units whose map :func:`read_record` must make again from their control image: with hires
    fix on, every unit but the v1.1 inpaint one (rebuilt from the init image and mask anyway). A
    ready-made map counts too: fitted from its own size to each pass's, it is not the saved one
    resized (1 level off in the image)."""
    if req.hires_scale <= 1:
        return []
    return [i for i, c in enumerate(req.controls) if c.annotator != "inpaint"]


def source_picture(spec) -> np.ndarray:
    """A unit's control image as saved for :func:`source_units`: (H, W, 3) uint8, transparency put
    on the background the unit itself puts it on (:func:`ctrlnet.generation.preprocess.annotate`:
    black for a ready-made map, white for an annotator), so the saved picture gives the same maps."""
    from ctrlnet.image import HWC3

    return HWC3(np.asarray(spec.image), background=0 if spec.annotator in (None, "none") else 255)


def model_spec(spec: str | None) -> str | None:
    """A model spec as it should be recorded: file paths absolute, others unchanged."""
    if spec is None or spec == "demo" or str(spec).startswith("random:"):
        return spec
    return str(Path(spec).expanduser().resolve())


def result_chunks(result: GenerationResult, base: str | None, controlnets: dict[str, str],
                  dtype: str | None = None, control_files: list[str] = (),
                  reference_files: dict[int, str] | None = None, k: int = 0, inputs: dict[str, str] | None = None,
                  vae: str | None = None, extras: dict | None = None,
                  control_sources: dict[int, str | None] | None = None) -> dict[str, str]:
    """The PNG text chunks for image ``k`` of a result: ``parameters`` plus the extended ``ctrlnet``
    JSON, which records that image's own seed and ``num_images=1`` (so it is made again alone).
    ``control_sources``: unit index -> file name of its saved control image (None: the init image)
    for the units of :func:`source_units`."""
    meta = result_metadata(result, base or "demo", k)
    record = json.loads(meta[RECORD_KEY])
    record.update(base=base, controlnets=dict(controlnets), control_maps=list(control_files), dtype=dtype)
    if inputs:
        record["inputs"] = dict(inputs)  # the init image and mask, saved next to the image
    if vae:
        record["vae"] = vae
    for key, paths in (extras or {}).items():  # embeddings / lora_dirs: what the prompt's names refer to
        if paths:
            record[key] = [model_spec(p) for p in paths]
    if reference_files:
        record["references"] = {str(i): name for i, name in reference_files.items()}
    if control_sources:
        record["control_sources"] = {str(i): name for i, name in control_sources.items()}
    meta[RECORD_KEY] = json.dumps(record)
    return meta


def check_output_dir(out_dir, create: bool = True) -> Path:
    """Make sure results can be written to ``out_dir`` before any work: refuse (ValueError naming the
    cause) a path that is a file, lies under a file, or is a folder we cannot write to.

    ``create=False`` leaves a missing folder uncreated (``generate`` makes it when it saves, so a
    run refused later leaves no empty folder behind) and probes its nearest existing parent."""
    import os
    import tempfile

    out = Path(out_dir).expanduser()
    existing = out
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"output folder {out} cannot be used: {p} is a file")
        if p.exists():
            existing = p
            break
    try:
        if create:
            out.mkdir(parents=True, exist_ok=True)
            existing = out
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"output folder {out} is not writable ({e.strerror or e})") from None
    return out


def free_name(folder: Path, stem: str) -> Path:
    """``folder/stem.png``, or with a ``-1``, ``-2``... suffix when taken (nothing is overwritten)."""
    path = folder / f"{stem}.png"
    k = 1
    while path.exists():
        path = folder / f"{stem}-{k}.png"
        k += 1
    return path


def save_result(result: GenerationResult, out_dir, base: str | None, controlnets: dict[str, str],
                dtype: str | None = None, vae: str | None = None, extras: dict | None = None) -> SavedResult:
    """Write control maps and images (``<seed>_control<i>.png``, ``<seed>_<i>.png``) to ``out_dir``.

    Existing files are never overwritten (a ``-1``, ``-2`` suffix is added).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    maps = [save_image(m, free_name(out, f"{result.seed}_control{i}")) for i, m in enumerate(result.control_maps)]
    refs = {i: save_image(c.reference, free_name(out, f"{result.seed}_reference{i}")).name
            for i, c in enumerate(result.request.controls) if c.reference is not None}
    names = [p.name for p in maps]
    req = result.request
    sources = {i: None if req.controls[i].image is None else
               save_image(source_picture(req.controls[i]), free_name(out, f"{result.seed}_control{i}_source")).name
               for i in source_units(req)}
    input_paths = {key: save_image(arr, free_name(out, f"{result.seed}_{key}"))
                   for key, arr in (("init_image", req.init_image), ("mask", req.mask)) if arr is not None}
    inputs = {key: p.name for key, p in input_paths.items()}
    images = [save_image(img, free_name(out, f"{result.seed}_{i}"),
                         result_chunks(result, base, controlnets, dtype, names, refs, k=i, inputs=inputs, vae=vae,
                                       extras=extras, control_sources=sources))
              for i, img in enumerate(result.images)]
    return SavedResult(images, maps, list(input_paths.values()) + [out / n for n in sources.values() if n])


def png_bytes(image: np.ndarray, chunks: dict[str, str] | None = None) -> bytes:
    """An image as PNG bytes with text chunks (for HTTP responses)."""
    from PIL import Image, PngImagePlugin

    from ctrlnet.image import HWC3

    info = None
    if chunks:
        info = PngImagePlugin.PngInfo()
        for k, v in chunks.items():
            info.add_text(k, v)
    buf = io.BytesIO()
    Image.fromarray(HWC3(image)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_chunks(path) -> dict[str, str]:
    """The text chunks of a PNG."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"no image file at {path}")
    try:
        with Image.open(path) as im:
            return {k: v for k, v in im.info.items() if isinstance(v, str)}
    except OSError as e:
        raise ImageError(f"{path} is not a readable image ({e})") from None


def read_record(path) -> Record:
    """Rebuild the request that made a PNG, with its control maps as ready-made controls."""
    from ctrlnet.interfaces.request_io import request_from_dict

    path = Path(path)
    raw = read_chunks(path).get(RECORD_KEY)
    if raw is None:
        raise ImageError(f"{path} has no '{RECORD_KEY}' text chunk: it was not written by ctrlnet generate "
                         "(or the chunk was stripped by an editor)")
    try:
        rec = json.loads(raw)
        req = dict(rec["request"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ImageError(f"{path}: the '{RECORD_KEY}' chunk is damaged ({e})") from None
    files = rec.get("control_maps") or []
    controls = req.get("controls") or []
    if len(files) != len(controls):
        raise ImageError(f"{path}: the record lists {len(controls)} controls but {len(files)} control map files")
    def sibling(name) -> np.ndarray:
        if not isinstance(name, str) or Path(name).name != name:  # files next to the image, nothing else
            raise ImageError(f"{path}: file name {name!r} in the record is not a plain file name")
        return load_image(path.parent / name)

    sources = rec.get("control_sources") or {}
    if not isinstance(sources, dict) or not all(str(i).isdigit() and int(i) < len(controls) for i in sources):
        raise ImageError(f"{path}: the record's control sources are damaged")
    sources = {int(i): name for i, name in sources.items()}
    # the saved maps are the annotators' output: use them as they are (the inpaint unit's map is
    # rebuilt from the init image and mask, which hold what its picture cannot: the -1 pixels; with
    # hires fix an annotated unit's annotator runs again on its saved control image, or the init image)
    again = {i for i, c in enumerate(controls) if c.get("annotator") == "inpaint"} | set(sources)
    images = [(sibling(sources[i]) if sources.get(i) is not None else None) if i in again else sibling(name)
              for i, name in enumerate(files)]
    req["controls"] = [c if i in again else
                       {**c, "annotator": None, "annotator_params": {}, "detect_resolution": None,
                        "pixel_perfect": False} for i, c in enumerate(controls)]
    request = request_from_dict(req, images, allow_server_fields=True)
    saved_inputs = rec.get("inputs") or {}
    if not isinstance(saved_inputs, dict) or set(saved_inputs) - {"init_image", "mask"}:
        raise ImageError(f"{path}: the record's inputs are damaged")
    if "init_image" in saved_inputs:
        request.init_image = sibling(saved_inputs["init_image"])
    if "mask" in saved_inputs:
        request.mask = sibling(saved_inputs["mask"])[:, :, 0]
    for i, name in (rec.get("references") or {}).items():
        if not (str(i).isdigit() and int(i) < len(request.controls)):
            raise ImageError(f"{path}: the record has a reference for control {i!r}, which does not exist")
        request.controls[int(i)].reference = sibling(name)
    return Record(request, rec.get("base"), dict(rec.get("controlnets") or {}), rec.get("dtype"), rec.get("vae"),
                  list(rec.get("embeddings") or []), list(rec.get("lora_dirs") or []))
