"""Colorization: line art through a line-art ControlNet (:mod:`.lineart`), and grayscale images
and video after a colour reference (:mod:`.reference`, :mod:`.video_job`) with the reference
ControlNet (:mod:`.reference_model`) trained by :mod:`.recipe` on data from :mod:`.pairs`.

Submodules are imported on use; importing this package loads nothing heavy.
"""
