"""Print the project's requirements (``[project] dependencies`` plus the given extras), one per line.

The Makefile installs these with pip's normal build isolation (so a dependency that builds from an
sdist, like seqeval, gets its own build requirements), then the project itself with
``--no-build-isolation --no-deps``: pyproject.toml stays the one list of dependencies.

    python .ci/requirements.py [EXTRA ...] > requirements.txt
"""

import sys
import tomllib

with open("pyproject.toml", "rb") as fh:
    project = tomllib.load(fh)["project"]
extras = project.get("optional-dependencies", {})
unknown = [name for name in sys.argv[1:] if name not in extras]
if unknown:
    sys.exit(f"unknown extra(s) {unknown}; pyproject.toml defines {sorted(extras)}")
for requirement in project["dependencies"] + [r for name in sys.argv[1:] for r in extras[name]]:
    print(requirement)
