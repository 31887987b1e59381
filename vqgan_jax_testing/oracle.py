"""Import helpers for the reference implementation used as a test oracle.

The reference (PyPI ``taming-transformers-rom1504``) is installed by
``requirements-dev.txt``; nothing here is copied from it, we only import it.

Its dependency torchvision 0.28 does not import next to the CPU build of
torch 2.13 unless the ``torchvision::nms`` operator schemas exist before the
first import, so :func:`taming` defines them first.
"""
import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_LIBS = []


@functools.lru_cache(maxsize=None)
def torch():
    import torch as _torch

    _torch.set_num_threads(2)
    try:
        lib = _torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define(
            "qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor")
        _LIBS.append(lib)  # the schemas live as long as the library object
    except RuntimeError:
        pass  # already defined (e.g. a working torchvision build)
    return _torch


def taming():
    """Returns the reference package, importing it after the torchvision fix."""
    torch()
    import taming  # noqa: F401
    import taming.models.vqgan  # noqa: F401
    import taming.models.cond_transformer  # noqa: F401
    import taming.modules.losses.vqperceptual  # noqa: F401
    return taming
