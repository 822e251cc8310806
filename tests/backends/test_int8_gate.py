"""The int8 export keeps the fastest quantization setting that passes the quality gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedplex.backends import onnx_export
from embedplex.core.errors import FatalBackendError


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scores: dict[str, float]) -> Path:
    tried: list[str] = []

    def fake_quantize(source: Path, target: Path, setting: str) -> None:
        tried.append(setting)
        target.write_text(setting)

    monkeypatch.setattr(onnx_export, "quantize_int8", fake_quantize)
    out = tmp_path / "out"
    out.mkdir()
    fp32 = tmp_path / "fp32.onnx"
    fp32.write_text("fp32")

    def check(reference: Path, candidate: Path) -> float:
        return scores[candidate.read_text()]

    onnx_export._quantize_checked(fp32, out, tmp_path, check, 0.97)
    return out


def test_fastest_setting_kept_when_it_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _run(tmp_path, monkeypatch, {"per-channel QInt8": 0.979, "per-channel QUInt8": 0.984})
    quality = json.loads((out / "quality.json").read_text())
    assert quality == {"min_cosine": 0.979, "setting": "per-channel QInt8"}


def test_falls_back_to_the_more_accurate_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _run(tmp_path, monkeypatch, {"per-channel QInt8": 0.95, "per-channel QUInt8": 0.975})
    assert json.loads((out / "quality.json").read_text())["setting"] == "per-channel QUInt8"
    assert (out / "model.onnx").read_text() == "per-channel QUInt8"


def test_refuses_when_no_setting_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FatalBackendError, match=r"per-channel QInt8: 0\.9000"):
        _run(tmp_path, monkeypatch, {"per-channel QInt8": 0.90, "per-channel QUInt8": 0.93})
