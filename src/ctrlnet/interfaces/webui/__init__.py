"""The web app (Gradio), a thin layer over :func:`ctrlnet.generation.run.generate`.

- :mod:`.app`: :func:`build_app`, the model menu, login, launching;
- :mod:`.generate_tab`: txt2img / img2img / inpaint (one builder) and :func:`run_generation`;
- :mod:`.units`: the ControlNet unit block reused in every tab, and the preprocessor preview;
- :mod:`.png_info`: reading an image's settings and sending them to a tab;
- :mod:`.colorize_tab`: line-art and reference colorization;
- :mod:`.models`, :mod:`.runs`, :mod:`.messages`: the model holder, interrupt flags, error messages.
"""

from ctrlnet.interfaces.webui.app import build_app, launch, read_auth_file
from ctrlnet.interfaces.webui.colorize_tab import run_colorize, run_lineart
from ctrlnet.interfaces.webui.generate_tab import RunOutput, run_generation
from ctrlnet.interfaces.webui.models import ModelHolder, as_loaded, scan_models_dir
from ctrlnet.interfaces.webui.units import UnitValues, preview_map

__all__ = ["ModelHolder", "RunOutput", "UnitValues", "as_loaded", "build_app", "launch", "preview_map",
           "read_auth_file", "run_colorize", "run_generation", "run_lineart", "scan_models_dir"]
