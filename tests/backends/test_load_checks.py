"""A backend that cannot serve fails its start: a graph with inputs the server does not feed,
an output narrower or wider than the model's hidden size, torch models of one process asking
for different thread counts, or ``--device cuda`` where CUDA does not load."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from embedplex.backends.model_files import load_spec
from embedplex.backends.onnx import OnnxBackend
from embedplex.backends.pytorch import TorchBackend
from embedplex.core.errors import FatalBackendError

pytestmark = pytest.mark.slow


def renamed_input(source: Path, target: Path, old: str, new: str) -> Path:
    """A copy of the model whose graph calls its input ``old`` ``new``."""
    import onnx

    shutil.copytree(source, target)
    graph = onnx.load(str(source / "onnx" / "model.onnx"))
    for value in graph.graph.input:
        if value.name == old:
            value.name = new
    for node in graph.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
    onnx.save(graph, str(target / "onnx" / "model.onnx"))
    return target


def test_a_graph_with_inputs_the_server_does_not_feed_fails_its_start(
    shipped_dir: Path, tmp_path: Path
) -> None:
    broken = renamed_input(shipped_dir, tmp_path / "m", "attention_mask", "mask")
    spec = load_spec(str(broken), broken)
    with pytest.raises(FatalBackendError, match=r"inputs \[.*'mask'.*\]: it needs input_ids"):
        OnnxBackend.load(spec, dtype="float32", device="cpu", cache_dir=tmp_path / "c", threads=1)


def test_an_output_of_another_width_than_the_config_says_fails_the_start(
    shipped_dir: Path, tmp_path: Path
) -> None:
    spec = dataclasses.replace(load_spec(str(shipped_dir), shipped_dir), hidden_size=16)
    with pytest.raises(FatalBackendError, match=r"output of shape \(1, 3, 32\), not \(1, 3, 16\)"):
        OnnxBackend.load(spec, dtype="float32", device="cpu", cache_dir=tmp_path / "c", threads=1)
    with pytest.raises(FatalBackendError, match=r"on torch: .*\(1, 3, 32\), not \(1, 3, 16\)"):
        TorchBackend.load(spec, dtype="float32", device="cpu", threads=1)


def test_torch_models_of_one_process_share_one_thread_count(tiny_model_dir: Path) -> None:
    spec = load_spec(str(tiny_model_dir), tiny_model_dir)
    first = TorchBackend.load(spec, dtype="float32", device="cpu", threads=1)
    try:
        TorchBackend.load(spec, dtype="float32", device="cpu", threads=1).close()  # the same
        with pytest.raises(FatalBackendError, match=r"runs on 1 threads per pass, not 2"):
            TorchBackend.load(spec, dtype="float32", device="cpu", threads=2)
    finally:
        first.close()
    TorchBackend.load(spec, dtype="float32", device="cpu", threads=2).close()  # none left open


def test_device_cuda_fails_the_start_where_the_cuda_provider_does_not_load(
    shipped_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime-gpu without a usable GPU lists CUDAExecutionProvider as available, then
    builds the session on the CPU (its log says "Failed to create CUDAExecutionProvider"). The
    CPU build does the same once told the provider is compiled in: it warns and falls back."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider: the fall-back is not what runs here")
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    spec = load_spec(str(shipped_dir), shipped_dir)
    cache = tmp_path / "c"
    refused = r"--device cuda asked for, but ONNX Runtime \S+ built the session on \['CPU"
    with pytest.raises(FatalBackendError, match=refused) as caught:
        OnnxBackend.load(spec, dtype="float32", device="cuda", cache_dir=cache, threads=1)
    assert "its CUDA provider did not load" in str(caught.value)
    # auto may fall back, and says where it runs.
    auto = OnnxBackend.load(spec, dtype="float32", device="auto", cache_dir=cache, threads=1)
    assert auto.device == "cpu"
    auto.close()


def test_torch_device_cuda_fails_the_start_without_a_cuda_device(tiny_model_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    spec = load_spec(str(tiny_model_dir), tiny_model_dir)
    with pytest.raises(FatalBackendError, match="--device cuda asked for, but torch sees no CUDA"):
        TorchBackend.load(spec, dtype="float32", device="cuda", threads=1)


def without_weights(source: Path, target: Path, part: str) -> Path:
    """A copy of the model whose checkpoint lacks every tensor named with ``part``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    weights = load_file(str(source / "model.safetensors"))
    kept = {name: tensor for name, tensor in weights.items() if part not in name.split(".")}
    assert len(kept) < len(weights)
    save_file(kept, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_a_checkpoint_missing_weights_fails_its_start_but_an_embedders_pooler(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """transformers fills missing weights with random numbers and only warns: a reranker
    without its head scored every pair at random, with a 200."""
    from tiny_models import make_tiny_reranker

    headless = without_weights(make_tiny_reranker(tmp_path / "rr"), tmp_path / "rr-", "classifier")
    spec = load_spec(str(headless), headless)
    with pytest.raises(FatalBackendError, match=r"no weights for classifier\.bias, classifier\.w"):
        TorchBackend.load(spec, dtype="float32", device="cpu", threads=1)
    # The same from the ONNX export, whose child loads the model the same way.
    with pytest.raises(FatalBackendError, match=r"no weights for classifier\.bias"):
        OnnxBackend.load(spec, dtype="float32", device="cpu", cache_dir=tmp_path / "cache")
    broken = without_weights(tiny_model_dir, tmp_path / "emb-", "layer")  # the encoder's layers
    with pytest.raises(FatalBackendError, match=r"\band \d+ more; transformers would make"):
        TorchBackend.load(load_spec(str(broken), broken), dtype="float32", device="cpu", threads=1)
    poolerless = without_weights(tiny_model_dir, tmp_path / "emb", "pooler")  # common, unread
    TorchBackend.load(
        load_spec(str(poolerless), poolerless), dtype="float32", device="cpu", threads=1
    ).close()
