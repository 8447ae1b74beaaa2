"""Every registered annotator name resolves to a callable; unknown names list the known ones."""

import pytest

from ctrlnet.annotators import get_annotator, list_annotators


def test_every_name_resolves():
    names = list_annotators()
    assert {"canny", "hed", "mlsd", "openpose", "lineart", "depth", "normal", "seg", "scribble", "invert"} <= set(names)
    for n in names:
        assert callable(get_annotator(n)), n


def test_unknown_name_lists_known():
    with pytest.raises(KeyError, match="known: .*canny"):
        get_annotator("nope")
