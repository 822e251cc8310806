"""The repeated-text workload: the share is exact, fresh texts never come back, and without
``repeat`` the load is today's, byte for byte."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from embedplex.bench.load import LoadOptions, pool_size, run_load, workload
from embedplex.bench.repeats import (
    RepeatedBodies,
    RepeatedTexts,
    RequestMaker,
    TextsExhaustedError,
)
from embedplex.bench.stats import Outcomes
from embedplex.bench.workload import WORDS, TokenSpec, build_requests, json_body, raw_request
from embedplex.cli.main import app

URL = "http://127.0.0.1:9"
SHORT = TokenSpec(14, 14)


@pytest.mark.parametrize("share", [0.0, 0.3, 0.9, 1.0])
def test_the_repeat_share_is_exact_at_every_point(share: float) -> None:
    texts = RepeatedTexts(SHORT, repeat=share, hot_set=64, seed=3)
    hot = set(texts.hot)
    assert len(hot) == (64 if share else 0)
    drawn = [texts() for _ in range(5000)]
    for n in (1, 7, 100, 999, 5000):
        assert sum(t in hot for t in drawn[:n]) == int(n * share)


def test_fresh_texts_never_repeat_nor_meet_the_hot_set() -> None:
    texts = RepeatedTexts(TokenSpec(5, 40), repeat=0.5, hot_set=16, seed=1)
    hot = set(texts.hot)
    drawn = [texts() for _ in range(20_000)]
    fresh = [t for t in drawn if t not in hot]
    assert len(fresh) == 10_000
    assert len(set(fresh)) == len(fresh)
    assert {t for t in drawn if t in hot} == hot  # 10,000 draws over 16 reach them all


def test_a_seed_gives_one_sequence_and_seeds_do_not_share_texts() -> None:
    def run(seed: int) -> list[str]:
        texts = RepeatedTexts(SHORT, repeat=0.3, hot_set=32, seed=seed)
        return [texts() for _ in range(2000)]

    assert run(5) == run(5)
    assert not set(run(5)) & set(run(6))


def test_short_texts_run_out_loudly() -> None:
    texts = RepeatedTexts(TokenSpec(3, 3), repeat=0.0)  # one word each
    drawn = {texts() for _ in range(len(WORDS))}
    assert drawn == set(WORDS)
    with pytest.raises(TextsExhaustedError, match="longer texts"):
        texts()


@pytest.mark.parametrize(
    ("dialect", "inputs", "model", "key"),
    [("openai", 1, None, None), ("tei", 3, "m", "secret"), ("openai", 2, "m", None)],
)
def test_at_zero_the_first_bodies_are_todays(
    dialect: str, inputs: int, model: str | None, key: str | None
) -> None:
    options = LoadOptions(
        url=URL,
        dialect=dialect,
        requests=10_000,
        inputs_per_request=inputs,
        model=model,
        api_key=key,
        repeat=0.0,
        seed=4,
    )
    stream = workload(options).bodies(0)
    today = build_requests(
        URL,
        dialect=dialect,
        tokens=SHORT,
        inputs_per_request=inputs,
        model=model,
        count=512,
        api_key=key,
        seed=4,
    )
    assert [stream() for _ in range(512)] == today
    # ... and then go on with new texts where today's generator starts over
    assert not {stream() for _ in range(512)} & set(today)


def test_without_repeat_each_worker_cycles_todays_bodies() -> None:
    options = LoadOptions(url=URL, requests=40, tokens=TokenSpec(5, 9), seed=2)
    today = build_requests(
        URL,
        dialect="openai",
        tokens=TokenSpec(5, 9),
        inputs_per_request=1,
        model=None,
        count=40,
        seed=2,
    )
    source = workload(options).bodies
    assert workload(options).priming == []
    for offset in (0, 7, 63):
        walk = source(offset)
        assert [walk() for _ in range(100)] == [today[(offset + i) % 40] for i in range(100)]


def test_request_maker_is_raw_request() -> None:
    maker = RequestMaker("http://127.0.0.1:9/custom", dialect="tei", model="m", api_key="k")
    body = json_body(["a", "b"], dialect="tei", model="m")
    assert maker(["a", "b"]) == raw_request(
        "http://127.0.0.1:9/custom", "/custom", body, api_key="k"
    )


@pytest.mark.parametrize(("repeat", "hot_set"), [(-0.1, 8), (1.5, 8), (0.5, 0)])
def test_bad_repeat_options_are_refused(repeat: float, hot_set: int) -> None:
    with pytest.raises(ValueError, match=r"repeat|hot set"):
        LoadOptions(url=URL, requests=1, repeat=repeat, hot_set=hot_set)


async def test_the_server_receives_the_share(recording: Any) -> None:
    """End to end: what a server is sent over warm-up and run alike honours the share."""
    with recording() as srv:
        result = await run_load(
            LoadOptions(
                url=srv.url,
                requests=300,
                concurrency=8,
                inputs_per_request=2,
                warmup=20,
                repeat=0.25,
                hot_set=8,
                seed=9,
            )
        )
        sent = list(srv.texts)
    assert (result.ok, result.fail) == (300, 0)
    twin = RepeatedTexts(SHORT, repeat=0.25, hot_set=8, seed=9)
    assert sorted(sent[:8]) == sorted(twin.hot)  # primed: each hot text once, before warm-up
    assert sorted(sent[8:]) == sorted(twin() for _ in range((300 + 20) * 2))
    hot = set(twin.hot)
    assert sum(t in hot for t in sent[8:]) == 160
    fresh = [t for t in sent if t not in hot]
    assert len(set(fresh)) == len(fresh) == 480


async def test_cli_load_takes_the_repeat_options(recording: Any, tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    args = ["--requests", "40", "--concurrency", "2", "--repeat", "0.5", "--hot-set", "4"]
    with recording() as srv:
        out = await asyncio.to_thread(
            CliRunner().invoke,
            app,
            ["bench", "load", "--url", srv.url, *args, "--seed", "7", "--json", str(target)],
        )
        sent = list(srv.texts)
    assert out.exit_code == 0, out.output
    data = json.loads(target.read_text())
    assert (data["ok"], data["repeat"], data["hot_set"], data["seed"]) == (40, 0.5, 4, 7)
    twin = RepeatedTexts(SHORT, repeat=0.5, hot_set=4, seed=7)
    assert sorted(sent) == sorted([*twin.hot, *(twin() for _ in range(40))])


@pytest.mark.parametrize("bad", [["--repeat", "1.5"], ["--repeat", "0.5", "--hot-set", "0"]])
def test_cli_load_refuses_bad_repeat_options(bad: list[str]) -> None:
    out = CliRunner().invoke(app, ["bench", "load", "--requests", "1", *bad])
    assert out.exit_code != 0
    assert "repeat" in out.output or "hot set" in out.output


def test_bodies_built_ahead_are_the_ones_the_stream_sends_in_order() -> None:
    options = LoadOptions(url=URL, requests=10_000, repeat=0.3, hot_set=8, seed=12)
    ahead, sent = workload(options), workload(options)
    ahead_stream, sent_stream = ahead.bodies(0), sent.bodies(0)
    assert ahead.prebuild is not None
    assert ahead.prebuild(300) == 300
    assert ahead.prebuild(100) == 300  # already built: nothing more
    assert [ahead_stream() for _ in range(500)] == [sent_stream() for _ in range(500)]


def test_building_ahead_stops_at_its_memory_bound() -> None:
    stream = workload(LoadOptions(url=URL, requests=10, repeat=0.0)).bodies(0)
    assert isinstance(stream, RepeatedBodies)
    size = len(stream())  # bodies of 14-token texts: about this long each
    assert 5 <= stream.prebuild(1000, max_bytes=10 * size) <= 20


def test_how_many_bodies_a_run_builds_ahead() -> None:
    assert pool_size(LoadOptions(url=URL, requests=700, repeat=0.0), None) == 700
    timed = LoadOptions(url=URL, duration=2.0, concurrency=4, repeat=0.0)
    warm = Outcomes()
    for _ in range(9):
        warm.record(200, 0.010)  # 4 workers, 10 ms each: 400 requests a second
    assert pool_size(timed, warm) == 1.25 * 400 * 2 + 4
    assert pool_size(timed, None) == 10_000  # no warm-up to time
    both = LoadOptions(url=URL, duration=2.0, requests=50, concurrency=4, repeat=0.0)
    assert pool_size(both, warm) == 50


async def test_no_body_is_built_while_the_run_is_measured(
    recording: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = {"before": 0, "during": 0}
    phase = ["before"]
    build = RepeatedBodies._build

    def counted(self: RepeatedBodies) -> bytes:
        built[phase[0]] += 1
        return build(self)

    monkeypatch.setattr(RepeatedBodies, "_build", counted)
    with recording() as srv:
        result = await run_load(
            LoadOptions(url=srv.url, requests=400, concurrency=8, warmup=40, repeat=0.0, seed=3),
            on_start=lambda: phase.__setitem__(0, "during"),
        )
        sent = list(srv.texts)
    assert result.ok == 400
    assert built == {"before": 440, "during": 0}
    twin = RepeatedTexts(SHORT, repeat=0.0, seed=3)
    assert sorted(sent) == sorted(twin() for _ in range(440))  # the seed's texts
