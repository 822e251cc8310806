"""Bake a model for an image that serves it without PyTorch (run in the Dockerfile's builder).

``python deploy/bake_model.py TARGET [MODEL_ID]`` writes TARGET as a model directory that ships
``onnx/model.onnx`` (traced once here, with PyTorch) beside the tokenizer and config files.
embedplex serves such a directory from that file, so the runtime stage needs ONNX Runtime only:
no torch (~1 GB of wheels) and no export on the first start. The PyTorch weights are left out;
they are only read to export, and the export is already here.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from embedplex.backends.model_files import DEFAULT_MODEL_ID, load_spec, resolve_model_dir
from embedplex.backends.onnx_export import export_fp32

# What serving reads from a model directory (backends/model_files.py); weights are not needed.
_SKIP = ("*.safetensors", "*.bin", "*.py", "__pycache__", "onnx", "README.md", ".gitattributes")


def bake(target: Path, model_id: str = DEFAULT_MODEL_ID) -> Path:
    """Write ``target`` (which must not exist yet) and return its ONNX file."""
    source, _ = resolve_model_dir(model_id)
    spec = load_spec(model_id, source)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*_SKIP))
    onnx = target / "onnx" / "model.onnx"
    onnx.parent.mkdir()
    export_fp32(source, onnx, with_token_type_ids=spec.has_token_type_ids, task=spec.kind.value)
    return onnx


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    onnx = bake(Path(argv[0]), *argv[1:])
    print(f"baked {onnx} ({onnx.stat().st_size // 1_000_000} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
