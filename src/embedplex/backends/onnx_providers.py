"""Which ONNX Runtime execution providers a session asks for, and whether it got them.

``get_available_providers`` lists the providers compiled into the installed onnxruntime, not
the ones that load: with ``onnxruntime-gpu`` whose CUDA provider cannot load (no GPU, or CUDA or
cuDNN libraries other than the build needs), ONNX Runtime logs "Failed to create
CUDAExecutionProvider" and builds the session on the CPU. So ``--device cuda`` checks the
session it got (``require_device``) and fails the start rather than serve on the CPU.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from embedplex.core.errors import FatalBackendError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def session_providers(device: str) -> list[str]:
    """The providers to ask a session for, best first. A ``cuda`` that this onnxruntime was not
    even built with is a setting's error, raised before anything loads."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda":
        if CUDA not in available:
            raise FatalBackendError(
                "--device cuda asked for, but this onnxruntime has no CUDA provider "
                "(install onnxruntime-gpu)"
            )
        return [CUDA, CPU]
    if device == "auto" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def session_options(device: str) -> dict[str, int]:
    """``InferenceSession`` keywords: with ``cuda``, ONNX Runtime's fall-back to the CPU (at
    creation, and on a provider's failure in a run) is off, so its error is raised instead."""
    return {"enable_fallback": 0} if device == "cuda" else {}


def require_device(session: object, device: str) -> None:
    """Refuse a session that ``--device cuda`` asked the CUDA provider for and that ONNX Runtime
    built on the CPU instead (it says so only in its log)."""
    if device != "cuda":
        return
    providers = list(session.get_providers())  # type: ignore[attr-defined]
    if providers[:1] == [CUDA]:
        return
    import onnxruntime as ort

    raise FatalBackendError(
        f"--device cuda asked for, but ONNX Runtime {ort.__version__} built the session on "
        f"{providers}: its CUDA provider did not load ({_cuda_load_error(ort.__file__)}). "
        f"{_build_needs()}; ONNX Runtime's 'Failed to create CUDAExecutionProvider' log line "
        "says more. Run where a GPU is visible (docker run --gpus all) or use --device cpu"
    )


def _cuda_load_error(ort_init: str) -> str:
    """Why the CUDA provider's library does not load: the loader's own words, which ONNX
    Runtime logs too (a missing libcublasLt.so.12, say); when it loads, the GPU is the cause."""
    library = Path(ort_init).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not library.is_file():
        return f"this onnxruntime has no {library.name}"
    try:
        ctypes.CDLL(str(library))
    except OSError as exc:
        return f"loading {library.name}: {exc}"
    return "its library loads, so no usable GPU is visible to this process"


def _build_needs() -> str:
    """The CUDA version this onnxruntime build was made for (``onnxruntime-gpu`` says)."""
    try:
        from onnxruntime.capi.build_and_package_info import cuda_version
    except ImportError:
        return "This onnxruntime names no CUDA version it was built for"
    return f"This onnxruntime is built for CUDA {cuda_version} (any {cuda_version.split('.')[0]}.x)"
