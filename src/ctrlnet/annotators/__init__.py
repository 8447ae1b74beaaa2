"""Annotators (preprocessors): ``name -> callable(uint8 HWC RGB image, **params) -> uint8 HWC map``.

Each detector lives in its own module and exports ``ANNOTATORS = {name: callable}``; the registry
imports a module only when one of its names is asked for, so no weights load at import.
"""

from ctrlnet.annotators.registry import get_annotator, list_annotators, run_annotator

__all__ = ["get_annotator", "list_annotators", "run_annotator"]
