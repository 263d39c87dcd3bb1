"""Triton kernels, installed as ``kdengine.kernels`` (never as a top-level ``kernels`` module).

Each module imports triton at its top: import them only through :mod:`kdengine.ops`, which does
so lazily when the Triton backend is selected.

In a checkout, this folder sits at the repository root, so whenever the root is on ``sys.path``
(``python -m ...`` or pytest run from there) ``import kernels`` would find it instead of the PyPI
package ``kernels`` that transformers imports (``transformers.integrations.hub_kernels``). Imported
under that top-level name, this file therefore hands the name on: it loads the ``kernels`` found
anywhere else on ``sys.path`` in its place. Where there is none, the module is left without
``__file__``, the mark of a PEP 420 namespace folder, which transformers' probe
(``is_kernels_available``) reads as "not installed"; raising instead would break that probe.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None:
        del __file__
    else:
        _module = importlib.util.module_from_spec(_spec)
        # The import system returns whatever sys.modules holds under the name once this file has run.
        sys.modules[__name__] = _module
        _spec.loader.exec_module(_module)
