"""ctrlnet: ControlNet for Stable Diffusion.

Importing the package loads no model and probes no device; see ``ctrlnet.pipeline`` for the
entry points.
"""

__version__ = "0.1.0"
