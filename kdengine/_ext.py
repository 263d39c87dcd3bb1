"""Loading of the optional compiled extension ``kdengine._C`` (csrc/), with the reason it failed."""

import functools


@functools.lru_cache(maxsize=1)
def load():
    """Return ``(module, reason)``: the imported ``kdengine._C`` or ``None`` and why it is missing."""
    try:
        from kdengine import _C  # noqa: PLC0415  (lazy on purpose: never at package import)
    except ImportError as exc:
        return None, (f"kdengine._C is not built ({exc}); reinstall with "
                      "KDENGINE_BUILD_CUDA=1 pip install --no-build-isolation -e . on a machine "
                      "with a CUDA torch and nvcc")
    return _C, "kdengine._C loaded"
