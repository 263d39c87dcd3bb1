"""``python -m kdengine.info``: versions, and each backend's availability with its reason."""

import importlib.metadata
import platform
import sys

# The stack kdengine is tested on (constraints.txt pins them; make test-latest prints what it got).
STACK = ("transformers", "tokenizers", "safetensors", "peft", "accelerate", "datasets", "triton", "numpy",
         "seqeval", "tensorboard", "matplotlib", "trl")


def stack_versions() -> str:
    """``name version`` of each package of the stack (``name -`` when not installed)."""
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    return "  ".join(f"{name} {version(name)}" for name in STACK)


def report() -> str:
    import torch  # noqa: PLC0415

    from kdengine import __version__  # noqa: PLC0415
    from kdengine.ops._backends import BACKENDS, availability, requested_backend  # noqa: PLC0415

    lines = [
        f"kdengine {__version__}  python {platform.python_version()}  torch {torch.__version__}"
        f"  (CUDA {torch.version.cuda or 'none'})",
        f"stack: {stack_versions()}",
        f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}",
        f"requested backend: {requested_backend(None)} (KDENGINE_BACKEND overrides)",
        "backends (auto order):",
    ]
    for name in BACKENDS:
        ok, why = availability(name)
        lines.append(f"  {name:<7} {'available  ' if ok else 'unavailable'}  {why}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
