"""Public kernels. This package is the only place that chooses a backend (see ``_backends``)."""

from kdengine.ops._backends import BackendUnavailable, availability
from kdengine.ops.kd_loss import kd_loss

__all__ = ["BackendUnavailable", "availability", "kd_loss"]
