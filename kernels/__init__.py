"""Triton kernels, installed as ``kdengine.kernels`` (never as a top-level ``kernels`` module).

Each module imports triton at its top: import them only through :mod:`kdengine.ops`, which does
so lazily when the Triton backend is selected.
"""
