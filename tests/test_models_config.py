"""[[models]] tables: defaults from the top level, one namespace with routes, allowed lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedplex.config import ModelConfig, Settings
from embedplex.gateway.allowed import AllowedModels


def write(tmp_path: Path, text: str) -> Path:
    file = tmp_path / "c.toml"
    file.write_text(text)
    return file


def test_tables_take_unset_keys_from_the_top_level(tmp_path: Path) -> None:
    file = write(
        tmp_path,
        """
max_batch_tokens = 4096
auto_truncate = true
dtype = "float16"

[[models]]
name = "a"
model_id = "org/a"

[[models]]
model_id = "org/b"
dtype = "int8"
max_batch_tokens = 1024
load = "lazy"
kind = "embed"
""",
    )
    s = Settings.load(file)
    a, b = s.local_models()
    assert (a.name, a.model_id, a.dtype, a.max_batch_tokens, a.auto_truncate) == (
        "a",
        "org/a",
        "float16",
        4096,
        True,
    )
    assert (b.name, b.dtype, b.max_batch_tokens, b.load, b.auto_truncate) == (
        "org/b",  # no name: the model id
        "int8",
        1024,
        "lazy",
        True,
    )
    # Flags set the defaults of the tables too (highest precedence at the top level).
    assert [
        m.max_batch_requests for m in Settings.load(file, max_batch_requests=7).local_models()
    ] == [
        7,
        7,
    ]


def test_flat_settings_still_serve_one_model() -> None:
    (only,) = Settings.load(model_id="org/x", served_model_name="x").local_models()
    assert (only.name, only.model_id, only.max_batch_tokens) == ("x", "org/x", 16384)
    assert (
        Settings.load(
            local_model=False,
            providers=[{"name": "p", "type": "tei", "endpoint": "http://h"}],
            routes=[{"model": "r", "providers": ["p"]}],
        ).local_models()
        == []
    )


def test_flat_model_keys_beside_tables_are_refused(tmp_path: Path) -> None:
    file = write(tmp_path, '[[models]]\nname = "a"\nmodel_id = "org/a"\n')
    with pytest.raises(ValueError, match="model_id describe the one model"):
        Settings.load(file, model_id="org/other")
    with pytest.raises(ValueError, match="served_model_name"):
        Settings.load(file, served_model_name="x")


@pytest.mark.parametrize(
    ("tables", "clash"),
    [
        (
            '[[models]]\nname = "m"\nmodel_id = "org/a"\n'
            '[[models]]\nname = "m"\nmodel_id = "org/b"\n',
            r"'m' is served twice \(\[\[models\]\] and \[\[models\]\]\)",
        ),
        (
            '[[models]]\nname = "m"\nmodel_id = "org/a"\n'
            '[[providers]]\nname = "p"\ntype = "tei"\nendpoint = "http://h"\n'
            '[[routes]]\nmodel = "m"\nproviders = ["p"]\n',
            r"'m' is served twice \(\[\[models\]\] and \[\[routes\]\]\)",
        ),
    ],
)
def test_one_namespace_for_models_and_routes(tmp_path: Path, tables: str, clash: str) -> None:
    with pytest.raises(ValueError, match=clash):
        Settings.load(write(tmp_path, tables))


def test_the_flat_model_and_a_route_share_the_namespace_too() -> None:
    with pytest.raises(ValueError, match="served twice"):
        Settings.load(
            served_model_name="m",
            providers=[{"name": "p", "type": "tei", "endpoint": "http://h"}],
            routes=[{"model": "m", "providers": ["p"]}],
        )


def test_table_keys_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs kind"):
        ModelConfig(model_id="org/a", load="lazy")
    with pytest.raises(ValueError, match="modle_id"):
        Settings.load(write(tmp_path, '[[models]]\nmodle_id = "org/a"\n'))
    with pytest.raises(ValueError, match="kind"):
        ModelConfig(model_id="org/a", kind="classify")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'a': max_batch_tokens must be at least"):
        Settings.load(
            write(tmp_path, '[[models]]\nname = "a"\nmodel_id = "o/a"\nmax_input_length = 64\n'),
            max_batch_tokens=32,
        )


def test_a_tables_default_prompt_is_one_choice(tmp_path: Path) -> None:
    """A table may not set both prompts; one that sets either takes neither from the top level
    (its literal prompt was served with the top level's prompt name beside it, which the
    model then dropped)."""
    with pytest.raises(ValueError, match="'a': default_prompt and default_prompt_name are one"):
        ModelConfig(model_id="org/a", name="a", default_prompt="q: ", default_prompt_name="q")
    file = write(
        tmp_path,
        """
default_prompt_name = "query"

[[models]]
name = "literal"
model_id = "org/a"
default_prompt = "search: "

[[models]]
name = "inherits"
model_id = "org/b"
""",
    )
    literal, inherits = Settings.load(file).local_models()
    assert (literal.default_prompt, literal.default_prompt_name) == ("search: ", None)
    assert (inherits.default_prompt, inherits.default_prompt_name) == (None, "query")


def test_allowed_lists_take_fastembed_strings_and_patterns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EMBEDPLEX_ALLOWED_EMBEDDING_MODELS", "minilm, bge-*")
    monkeypatch.setenv("EMBEDPLEX_ALLOWED_RERANK_MODELS", "*")
    s = Settings.load()
    assert s.allowed_embedding_models == ["minilm", "bge-*"]
    allowed = AllowedModels.from_settings(s)
    assert allowed.allows("minilm", "embedding")
    assert allowed.allows("bge-small", "embedding")
    assert not allowed.allows("minilm-int8", "embedding")
    assert not allowed.allows("MINILM", "embedding")  # case matters, as names do
    assert allowed.allows("anything", "reranker")
    assert allowed.restricted("embedding") and allowed.restricted("reranker")
    monkeypatch.setenv("EMBEDPLEX_ALLOWED_EMBEDDING_MODELS", '["a", "b"]')
    assert Settings.load().allowed_embedding_models == ["a", "b"]
    monkeypatch.delenv("EMBEDPLEX_ALLOWED_EMBEDDING_MODELS")
    monkeypatch.delenv("EMBEDPLEX_ALLOWED_RERANK_MODELS")
    unset = AllowedModels.from_settings(Settings.load())
    assert not unset.restricted("reranker")
    assert unset.allows("whatever", "reranker")
