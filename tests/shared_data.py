"""Where the project's real datasets live (never committed): ``../shared/data`` beside the checkout.

``KDENGINE_SHARED_DATA`` overrides; tests that need a dataset skip when its folder is absent.
"""

import os

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CANDIDATES = (os.environ.get("KDENGINE_SHARED_DATA"), os.path.join(_REPO, "..", "shared", "data"),
               "/work/shared/data")
SHARED_DATA = next((os.path.normpath(p) for p in _CANDIDATES if p and os.path.isdir(p)),
                   os.path.normpath(os.path.join(_REPO, "..", "shared", "data")))
