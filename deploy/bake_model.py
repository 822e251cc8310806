"""Bake a model for an image that serves it without PyTorch (run in the Dockerfile's builder).

``python deploy/bake_model.py TARGET [MODEL_ID] [--hub-timeout-s S]`` writes TARGET as a model
directory that ships ``onnx/model.onnx`` (traced once here, with PyTorch) beside the tokenizer
and config files. embedplex serves such a directory from that file, so the runtime stage needs
ONNX Runtime only: no torch (~1 GB of wheels) and no export on the first start. The PyTorch
weights are left out; they are only read to export, and the export is already here.

A MODEL_ID from the hub downloads within ``hub_timeout_s``, as ``serve`` does: the flag, else
``EMBEDPLEX_HUB_TIMEOUT_S`` (``docker build --build-arg EMBEDPLEX_HUB_TIMEOUT_S=7200``), else
the default (docs/configuration.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from embedplex.backends.hub import HUB_TIMEOUT_S
from embedplex.backends.model_files import DEFAULT_MODEL_ID, load_spec, resolve_model_dir
from embedplex.backends.onnx_export import export_fp32
from embedplex.core.errors import FatalBackendError

# What serving reads from a model directory (backends/model_files.py); weights are not needed.
_SKIP = ("*.safetensors", "*.bin", "*.py", "__pycache__", "onnx", "README.md", ".gitattributes")


def bake(
    target: Path, model_id: str = DEFAULT_MODEL_ID, *, hub_timeout_s: float = HUB_TIMEOUT_S
) -> Path:
    """Write ``target`` (which must not exist yet) and return its ONNX file."""
    source, _ = resolve_model_dir(model_id, hub_timeout_s=hub_timeout_s)
    spec = load_spec(model_id, source)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*_SKIP))
    onnx = target / "onnx" / "model.onnx"
    onnx.parent.mkdir()
    export_fp32(source, onnx, with_token_type_ids=spec.has_token_type_ids, task=spec.kind.value)
    return onnx


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="bake_model.py", description="Bake a model directory that ships onnx/model.onnx."
    )
    parser.add_argument("target", type=Path)
    parser.add_argument("model_id", nargs="?", default=DEFAULT_MODEL_ID)
    parser.add_argument(
        "--hub-timeout-s",
        type=_seconds,
        default=os.environ.get("EMBEDPLEX_HUB_TIMEOUT_S") or HUB_TIMEOUT_S,
        help="the longest the hub download may take (default: EMBEDPLEX_HUB_TIMEOUT_S, "
        f"else {HUB_TIMEOUT_S:g})",
    )
    args = parser.parse_args(argv)
    try:
        onnx = bake(args.target, args.model_id, hub_timeout_s=args.hub_timeout_s)
    except FatalBackendError as exc:  # the reason, in one line, as serve says it
        print(f"bake_model.py: {exc.message}", file=sys.stderr)
        return 1
    print(f"baked {onnx} ({onnx.stat().st_size // 1_000_000} MB)")
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 seconds")
    return value


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
