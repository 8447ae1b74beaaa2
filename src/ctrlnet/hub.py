"""The model manager: a table of the official weights, finding them on disk, downloading them.

Nothing downloads at import or on lookup. :func:`resolve` searches local folders and the Hugging
Face cache layout (``models--owner--name/snapshots/<rev>/<file>``) without the network and, when a
file is missing, says exactly which file, where it looked, and how to get it. :func:`download` goes
through ``huggingface_hub`` (resumable, into its cache or a folder) and checks the SHA-256 the hub
publishes for the file.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

ENV_DIRS = "CTRLNET_MODELS_DIR"  # extra folders to search, os.pathsep-separated
GB, MB = 1_000_000_000, 1_000_000


@dataclass(frozen=True)
class HubModel:
    """One official file: where it lives on the hub and roughly how big it is."""

    name: str
    kind: str  # "base" | "controlnet" | "annotator"
    repo: str
    filename: str
    size: int  # bytes, approximate
    description: str
    extra_files: tuple[str, ...] = ()  # fetched along (the 1.1 models' yaml files)
    sha256: str | None = None  # when known ahead; otherwise the hub's LFS hash is checked
    mirrors: tuple[str, ...] = ()  # other repos with the same file

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/resolve/main/{self.filename}"

    @property
    def files(self) -> tuple[str, ...]:
        return (self.filename, *self.extra_files)


class MissingModelError(FileNotFoundError):
    """A model file that is not on this machine; the message says how to get it."""


def _table() -> list[HubModel]:
    t = [
        HubModel("sd15", "base", "runwayml/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors", int(4.27 * GB),
                 "Stable Diffusion 1.5 (EMA weights), the base of every official ControlNet",
                 mirrors=("stable-diffusion-v1-5/stable-diffusion-v1-5",)),
        HubModel("sd21-base", "base", "stabilityai/stable-diffusion-2-1-base", "v2-1_512-ema-pruned.safetensors",
                 int(5.21 * GB), "Stable Diffusion 2.1 base, 512px, eps prediction"),
        HubModel("sd21", "base", "stabilityai/stable-diffusion-2-1", "v2-1_768-ema-pruned.safetensors",
                 int(5.21 * GB), "Stable Diffusion 2.1, 768px, v prediction (use --parameterization v)"),
    ]
    v10 = {"canny": "Canny edges", "depth": "MiDaS depth", "hed": "HED soft edges", "mlsd": "M-LSD straight lines",
           "normal": "normal map from depth", "openpose": "OpenPose skeleton", "scribble": "user scribbles",
           "seg": "ADE20K segmentation"}
    for k, d in v10.items():
        t.append(HubModel(f"control_sd15_{k}", "controlnet", "lllyasviel/ControlNet", f"models/control_sd15_{k}.pth",
                          int(5.71 * GB), f"ControlNet 1.0: {d} (file includes the SD1.5 weights)"))
    v11 = {
        "control_v11p_sd15_canny": "Canny edges", "control_v11p_sd15_mlsd": "M-LSD straight lines",
        "control_v11f1p_sd15_depth": "depth (MiDaS/LeReS/Zoe)", "control_v11p_sd15_normalbae": "Bae normal map",
        "control_v11p_sd15_seg": "segmentation (ADE20K/COCO)", "control_v11p_sd15_inpaint": "inpainting",
        "control_v11p_sd15_lineart": "line art", "control_v11p_sd15s2_lineart_anime": "anime line art",
        "control_v11p_sd15_openpose": "OpenPose body, hands, face", "control_v11p_sd15_scribble": "scribbles",
        "control_v11p_sd15_softedge": "soft edges (HED/PiDiNet)", "control_v11e_sd15_shuffle": "content shuffle",
        "control_v11e_sd15_ip2p": "instruct pix2pix", "control_v11f1e_sd15_tile": "tile / detail",
    }
    for k, d in v11.items():
        t.append(HubModel(k, "controlnet", "lllyasviel/ControlNet-v1-1", f"{k}.pth", int(1.45 * GB),
                          f"ControlNet 1.1: {d}", extra_files=(f"{k}.yaml",)))
    ann = [
        ("ControlNetHED.pth", 29.4 * MB, "hed", "HED soft-edge network"),
        ("table5_pidinet.pth", 2.87 * MB, "softedge_pidinet", "PiDiNet soft edges"),
        ("mlsd_large_512_fp32.pth", 6.34 * MB, "mlsd", "M-LSD line detector"),
        ("body_pose_model.pth", 209 * MB, "openpose", "OpenPose body"),
        ("hand_pose_model.pth", 147 * MB, "openpose_hand", "OpenPose hands"),
        ("sk_model.pth", 17.2 * MB, "lineart", "line art (realistic)"),
        ("sk_model2.pth", 17.2 * MB, "lineart_coarse", "line art (coarse)"),
        ("netG.pth", 218 * MB, "lineart_anime", "anime line art"),
        ("dpt_hybrid-midas-501f0c75.pt", 492 * MB, "depth (original)", "MiDaS DPT-hybrid depth"),
        ("upernet_global_small.pth", 206 * MB, "seg (original)", "UniFormer ADE20K segmentation"),
        ("scannet.pt", 292 * MB, "normal_bae (original)", "Bae et al. normals"),
    ]
    for fname, size, used_by, d in ann:
        t.append(HubModel(Path(fname).stem, "annotator", "lllyasviel/Annotators", fname, int(size),
                          f"annotator weights: {d} (used by {used_by})"))
    return t


MODELS: dict[str, HubModel] = {m.name: m for m in _table()}


def list_models(kind: str | None = None) -> list[HubModel]:
    """The table, optionally only one kind (``base``, ``controlnet``, ``annotator``)."""
    return [m for m in MODELS.values() if kind is None or m.kind == kind]


def get_model(name: str) -> HubModel:
    """Look up by name or file name (case-insensitive); a KeyError suggests close names."""
    key = name.strip()
    for m in MODELS.values():
        if key.lower() in (m.name.lower(), m.filename.lower(), Path(m.filename).name.lower()):
            return m
    close = difflib.get_close_matches(key, list(MODELS), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `ctrlnet models list`"
    raise KeyError(f"unknown model {name!r}{hint}")


def default_cache_dir() -> Path:
    """The Hugging Face hub cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home).expanduser() / "hub"


def search_dirs(dirs=()) -> list[Path]:
    """Folders to search: those given, then ``$CTRLNET_MODELS_DIR``."""
    out = [Path(d).expanduser() for d in dirs]
    env = os.environ.get(ENV_DIRS)
    if env:
        out += [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    return out


def _in_hub_cache(cache: Path, repo: str, filename: str) -> Path | None:
    """The file in a hub cache laid out as ``models--a--b/snapshots/<rev>/<file>``; refs/main first."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snaps = root / "snapshots"
    if not snaps.is_dir():
        return None
    revs = []
    ref = root / "refs" / "main"
    if ref.is_file():
        revs.append(ref.read_text().strip())
    revs += sorted(p.name for p in snaps.iterdir() if p.name not in revs)
    for rev in revs:
        p = snaps / rev / filename
        if p.is_file():  # follows the blob symlink; a dangling link is an unfinished download
            return p
    return None


def _find_file(m: HubModel, filename: str, dirs: list[Path], cache_dir: Path) -> Path | None:
    base = Path(filename).name
    for d in dirs:
        for p in (d / base, d / filename, d / m.repo / filename, d / m.name / base):
            if p.is_file():
                return p
        hit = _in_hub_cache(d, m.repo, filename)  # a folder may itself be a hub cache
        if hit:
            return hit
    for repo in (m.repo, *m.mirrors):
        hit = _in_hub_cache(cache_dir, repo, filename)
        if hit:
            return hit
    return None


def find(name: str, dirs=(), cache_dir=None) -> dict[str, Path | None]:
    """Each file of a model -> its local path, or None where missing. Never uses the network."""
    m = get_model(name)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    ds = search_dirs(dirs)
    return {f: _find_file(m, f, ds, cache) for f in m.files}


def resolve(name: str, dirs=(), cache_dir=None) -> Path:
    """The local path of a model's main file; MissingModelError says what is missing and how to get it."""
    m = get_model(name)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    found = find(name, dirs, cache)
    missing = [f for f, p in found.items() if p is None]
    if not missing:
        return found[m.filename]
    raise MissingModelError(_missing_message(m, missing, dirs, cache,
                                             f"Get it with `ctrlnet models download {m.name}` (needs internet), or"))


def _missing_message(m: HubModel, missing: list[str], dirs, cache: Path, get_it: str) -> str:
    """What is missing, where it was looked for, and (after ``get_it``) the files to fetch by hand."""
    where = [str(d) for d in search_dirs(dirs)] + [f"{cache} (Hugging Face cache)"]
    urls = "; ".join(f"https://huggingface.co/{m.repo}/resolve/main/{f}" for f in missing)
    return (f"{m.name}: missing {', '.join(missing)} (about {human_size(m.size)}). Searched: {'; '.join(where)}. "
            f"{get_it} download {urls} by hand into a folder and name it in ${ENV_DIRS} "
            "(`ctrlnet models` also takes --dir <folder>).")


def _download_failure(e: BaseException) -> str:
    """Why a download failed, in words: the innermost cause huggingface_hub wrapped (a DNS or
    connection error, say), or that offline mode is on."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so the hub is not asked (unset it to download)"
    inner = e
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__
    text = str(inner).strip() or inner.__class__.__name__
    return f"the Hugging Face hub could not be reached ({text}); check the network, a proxy (HTTPS_PROXY) or HF_ENDPOINT"


def human_size(n: int) -> str:
    for unit, k in (("GB", GB), ("MB", MB), ("kB", 1000)):
        if n >= k:
            return f"{n / k:.2f} {unit}" if unit == "GB" else f"{n / k:.0f} {unit}"
    return f"{n} B"


def _hub_sha256(repo: str, filename: str, token=None) -> str | None:
    """The LFS SHA-256 the hub publishes for a file (None for small non-LFS files or on error)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().get_paths_info(repo, [filename], token=token)
    except Exception:  # metadata is a bonus check; the download itself already succeeded
        return None
    lfs = getattr(info[0], "lfs", None) if info else None
    return getattr(lfs, "sha256", None) if lfs else None


def download(name: str, cache_dir=None, local_dir=None, dirs=(), token=None, verify: bool = True,
             progress=print) -> Path:
    """Fetch a model's files (skipped when already on disk); returns the main file's path.

    Downloads resume where they stopped (``huggingface_hub``); files already in ``dirs``,
    ``local_dir`` or the cache are not fetched again. Offline (``HF_HUB_OFFLINE=1`` or no network)
    :class:`MissingModelError` says what is missing, why the download failed (the innermost cause,
    e.g. a DNS error) and which files to fetch by hand.
    """
    m = get_model(name)
    dirs = [*dirs, local_dir] if local_dir else list(dirs)  # files put there by an earlier download count
    found = find(name, dirs, cache_dir)
    if all(found.values()):
        progress(f"{m.name}: already here: {found[m.filename]}")
        return found[m.filename]
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise MissingModelError(f"downloading needs huggingface_hub: pip install 'ctrlnet[hub]'. "
                                f"Or fetch {m.url} by hand.") from None
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    paths = {}
    for f in m.files:
        if found[f] is not None:
            paths[f] = found[f]
            continue
        last = None
        for repo in (m.repo, *m.mirrors):
            progress(f"{m.name}: downloading {f} from {repo} (about {human_size(m.size) if f == m.filename else 'small'})")
            try:
                p = Path(hf_hub_download(repo, f, cache_dir=cache_dir, local_dir=local_dir, token=token))
            except RepositoryNotFoundError as e:  # a moved repo: try the mirror
                last = e
                continue
            except (LocalEntryNotFoundError, OSError) as e:  # offline or network down
                progress(f"{m.name}: cannot download ({e.__class__.__name__})")
                cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
                missing = [g for g in m.files if found[g] is None]
                # not resolve()'s message: it would advise the very command that just failed
                raise MissingModelError(_missing_message(
                    m, missing, dirs, cache,
                    f"Downloading {f} from {repo} failed: {_download_failure(e)}. Try again later, or")) from None
            want = m.sha256 if f == m.filename and m.sha256 else (_hub_sha256(repo, f, token) if verify else None)
            if want:
                from ctrlnet.checkpoints.hashes import sha256_file  # (imports torch: only here)

                got = sha256_file(p)  # uncached: a fresh download is checked once
                if got != want:
                    p.unlink(missing_ok=True)
                    raise MissingModelError(f"{f}: checksum mismatch (got {got}, expected {want}); removed, try again")
                progress(f"{m.name}: {f}: sha256 ok")
            paths[f] = p
            break
        else:
            raise MissingModelError(f"{m.name}: repository {m.repo} not found on the hub ({last})")
    return paths[m.filename]
