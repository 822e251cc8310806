"""The ONNX exporter, run in a child process: ``python -m embedplex.backends.onnx_export``.

It traces a Hugging Face encoder with PyTorch, converts it to the served dtype (float16; int8
with its quality gate against float32) and writes ``model.onnx`` into a work directory that the
server then renames into its cache (``onnx_cache.py``). It runs in its own process so that the
server never holds PyTorch, transformers or the quantizer: their memory goes when the child
exits (figures in docs/architecture.md, "Export in a child process").

Exit status: 0 written; 2 refused (a ``FatalBackendError``: its message is the child's last
ERROR line); 1 any other failure (the traceback follows an ERROR line naming it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from embedplex.backends.child import REFUSED, child_logging, exit_with_parent
from embedplex.backends.model_files import (
    ModelKind,
    ModelSpec,
    Pooling,
    load_spec,
    load_transformers_model,
)
from embedplex.backends.weights import copy_onnx
from embedplex.core.errors import FatalBackendError
from embedplex.core.faults import fault

# By name: run with ``-m``, this module's ``__name__`` is ``__main__``.
logger = logging.getLogger("embedplex.backends.onnx_export")

EXPORT_FORMAT = "2"  # bump when the exported graph's inputs or outputs change
OPSET = 17


def export_fp32(
    model_dir: Path,
    target: Path,
    *,
    with_token_type_ids: bool,
    task: str = "embedding",
    model_type: str = "bert",
) -> None:
    """Trace the model to ONNX with dynamic batch and sequence axes.

    Embedding models give ``last_hidden_state`` (pooling happens after; a T5-style model's
    encoder alone, ``load_transformers_model``); rerankers (sequence classification) give
    ``logits``.
    """
    try:
        import torch
        import transformers  # noqa: F401  (only to say what is missing)
    except ImportError as exc:
        raise FatalBackendError(
            "exporting to ONNX needs PyTorch: install embedplex[torch], or give a model "
            "directory that ships onnx/model.onnx"
        ) from exc

    output = "logits" if task == "reranker" else "last_hidden_state"
    model = load_transformers_model(model_dir, ModelKind(task), model_type, torch.float32)
    model.eval()

    class Encoder(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            names = ["input_ids", "attention_mask", "token_type_ids"][: len(args)]
            out: torch.Tensor = getattr(self.inner(**dict(zip(names, args, strict=True))), output)
            return out

    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_token_type_ids else [])
    ids = torch.ones((2, 8), dtype=torch.long)
    # A padded row, so that no "mask is all ones, skip it" shortcut is traced as a constant.
    mask = torch.ones((2, 8), dtype=torch.long)
    mask[1, 5:] = 0
    sample = (ids, mask, torch.zeros((2, 8), dtype=torch.long))[: len(names)]
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "sequence"} for name in names}
    axes[output] = {0: "batch"} if task == "reranker" else {0: "batch", 1: "sequence"}
    with torch.inference_mode(), warnings.catch_warnings():
        # Tracer warnings are about shape checks that hold for every input we feed.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Encoder(model),
            sample,
            str(target),
            input_names=names,
            output_names=[output],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )


# Dynamic int8 settings, tried in order; the first whose min cosine against fp32 passes the gate
# is kept. Measured on all-MiniLM-L6-v2, 2-core AMD EPYC, side by side against fp32:
#   per-tensor QInt8 (quantize_dynamic's default)  min cos 0.909            2.1x
#   per-channel QInt8 weights                      min cos 0.979  1.5-2.3x (u8 x s8 kernels)
#   per-channel QUInt8 weights                     min cos 0.984  1.2-1.3x
INT8_SETTINGS = ("per-channel QInt8", "per-channel QUInt8")
INT8_FORMAT = "2"  # bump when INT8_SETTINGS change: int8 cache entries are keyed by it


def quantize_int8(source: Path, target: Path, setting: str = INT8_SETTINGS[0]) -> None:
    """Dynamic int8 quantization of the weights (activations are quantized at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight_type = QuantType.QInt8 if setting.endswith("QInt8") else QuantType.QUInt8
    quantize_dynamic(
        str(source),
        str(target),
        per_channel=setting.startswith("per-channel"),
        weight_type=weight_type,
        use_external_data_format=_external_data(source),
    )


def convert_fp16(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    external = _external_data(source)
    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    if external:
        location = f"{target.name}.data"
        onnx.save(model, str(target), save_as_external_data=True, location=location)
    else:
        onnx.save(model, str(target))


def _external_data(path: Path) -> bool:
    """Whether the graph at ``path`` keeps weights in files beside it (a model past protobuf's
    2 GB): what it is turned into keeps them beside it too."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    return any(uses_external_data(t) for t in model.graph.initializer)


QualityCheck = Callable[[Path, Path], float]


def _quantize_checked(
    fp32: Path, out: Path, model_dir: Path, check: QualityCheck | None, min_quality: float
) -> None:
    """Quantize with the fastest setting that holds quality; refuse when none does."""
    measured: list[str] = []
    for setting in INT8_SETTINGS:
        quantize_int8(fp32, out / "model.onnx", setting)
        if check is None:
            return
        quality = check(fp32, out / "model.onnx")
        logger.warning("int8 export (%s): min cosine vs float32 = %.5f", setting, quality)
        if quality >= min_quality:
            record = {"min_cosine": quality, "setting": setting}
            (out / "quality.json").write_text(json.dumps(record))
            return
        measured.append(f"{setting}: {quality:.4f}")
    raise FatalBackendError(
        f"int8 quantization of {model_dir} stays below the required min cosine of {min_quality} "
        f"against float32 ({'; '.join(measured)}); serve float32 or lower --int8-min-cosine"
    )


def build(
    spec: ModelSpec,
    work: Path,
    *,
    dtype: str,
    threads: int | None = None,
    min_quality: float = 0.0,
) -> Path:
    """Write ``work/out/model.onnx`` (with its external data, if any, beside it, and
    ``quality.json`` for int8) and return ``work/out``.

    ``work`` is the server's empty temporary directory; the server publishes ``work/out`` into
    its cache only when this process exits 0. A model's own ``onnx/model.onnx`` is read where it
    lies, so that the graph finds its external data.
    """
    out = work / "out"
    shipped = spec.onnx_file
    if shipped is not None:
        fp32 = shipped
    else:
        logger.info("exporting %s to ONNX", spec.path)
        # A directory of its own: a graph past 2 GB is written with its weights in files beside it.
        (work / "fp32").mkdir()
        fp32 = work / "fp32" / "model.onnx"
        export_fp32(
            spec.path,
            fp32,
            with_token_type_ids=spec.has_token_type_ids,
            task=spec.kind.value,
            model_type=spec.model_type,
        )
    if dtype == "float32":
        if shipped is not None:
            out.mkdir()
            copy_onnx(spec.path, out)
        else:
            fp32.parent.rename(out)
        return out
    out.mkdir()
    if dtype == "int8":
        from embedplex.backends.int8_gate import int8_quality_check

        check = int8_quality_check(spec, threads)
        _quantize_checked(fp32, out, spec.path, check, min_quality)
    else:
        convert_fp16(fp32, out / "model.onnx")
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m embedplex.backends.onnx_export",
        description="Export a model directory to ONNX into WORK/out (the server runs this).",
    )
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("work", type=Path, help="an empty directory; the result is WORK/out")
    parser.add_argument("--dtype", choices=("float32", "float16", "int8"), default="float32")
    parser.add_argument("--pooling", choices=[p.value for p in Pooling], default=None)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="int8 gate's intra-op threads")
    parser.add_argument("--min-cosine", type=float, default=0.0, help="int8 quality gate")
    parser.add_argument("--watch-parent", action="store_true", help="exit when stdin closes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    child_logging()
    if args.watch_parent:
        exit_with_parent()
    try:
        spec = load_spec(
            str(args.model_dir),
            args.model_dir,
            pooling=Pooling(args.pooling) if args.pooling else None,
            max_input_length=args.max_length,
        )
        build(spec, args.work, dtype=args.dtype, threads=args.threads, min_quality=args.min_cosine)
    except FatalBackendError as exc:  # its traceback too where a fault in code caused it
        logger.error("%s", exc.message, exc_info=exc if fault(exc) is not None else None)
        return REFUSED
    except Exception as exc:
        logger.exception("%s: %s", type(exc).__name__, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
