"""The real default model, served as ``embedplex serve`` would, reports the same metrics."""

from __future__ import annotations

import httpx
import pytest

from embedplex.api.app import create_app
from embedplex.config import Settings

from .conftest import parse_metrics, value, wait_ready


@pytest.mark.model
async def test_real_model_request_moves_metrics() -> None:
    app = create_app(Settings(served_model_name="minilm"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await wait_ready(c)
            texts = ["embedplex serves embeddings", "short"]
            r = await c.post("/v1/embeddings", json={"input": texts})
            assert r.status_code == 200
            m = parse_metrics((await c.get("/metrics")).text)
    assert value(m, "embedplex_inputs_total", model="minilm") == 2
    assert value(m, "embedplex_tokens_total", model="minilm") == r.json()["usage"]["prompt_tokens"]
    assert value(m, "embedplex_batch_padding_ratio_sum", model="minilm") > 0
    assert value(m, "embedplex_inference_duration_seconds_sum", model="minilm") > 0
    (build,) = [dict(k[1]) for k in m if k[0] == "embedplex_build_info"]
    assert build["backend"] == "onnx"
    assert build["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
