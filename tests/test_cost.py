"""The one cost model: padded tokens per batch, decided once, applied by every batch cutter."""

from __future__ import annotations

import random

import pytest

from embedplex.batching import TokenBudget, padded_cost


def test_padded_cost_is_longest_times_rows() -> None:
    assert padded_cost([]) == 0
    assert padded_cost([3, 9, 4]) == 27


def test_the_budget_is_the_setting_cut_to_one_pass_of_the_backend() -> None:
    def decide(tokens: int, pass_tokens: int | None) -> TokenBudget:
        return TokenBudget.decide(
            max_batch_tokens=tokens, max_batch_requests=32, run_tokens=pass_tokens
        )

    assert decide(16384, None) == TokenBudget(tokens=16384, items=32)  # runs any batch whole
    assert decide(16384, 512) == TokenBudget(tokens=512, items=32)  # one pass of 512
    assert decide(256, 512) == TokenBudget(tokens=256, items=32)  # the setting, when lower


def test_a_budget_needs_room_for_one_row() -> None:
    with pytest.raises(ValueError, match="items >= 1"):
        TokenBudget(tokens=100, items=0)
    with pytest.raises(ValueError, match="tokens >= 1"):
        TokenBudget(tokens=0, items=4)


def test_fits_counts_padded_tokens_and_rows() -> None:
    budget = TokenBudget(tokens=60, items=3)
    assert budget.fits(20, 3)  # 20 x 3 = 60
    assert not budget.fits(21, 3)
    assert not budget.fits(5, 4)  # few tokens, one row too many
    assert TokenBudget(tokens=None, items=2).fits(10_000, 2)


def test_a_batch_that_fits_is_one_piece_in_its_own_order() -> None:
    budget = TokenBudget(tokens=15, items=8)
    assert budget.pieces([]) == []
    assert budget.pieces([5, 3, 4]) == [[0, 1, 2]]
    assert TokenBudget(tokens=None, items=8).pieces([500, 3]) == [[0, 1]]


def test_pieces_are_length_sorted_and_each_fits() -> None:
    lengths = [50, 10, 40, 10, 12, 60]
    pieces = TokenBudget(tokens=60, items=8).pieces(lengths)
    assert pieces[0] == [1, 3, 4]  # the three shortest together: 12 x 3 = 36
    assert sorted(k for piece in pieces for k in piece) == list(range(len(lengths)))
    for piece in pieces:
        assert padded_cost([lengths[k] for k in piece]) <= 60


def test_a_row_over_the_budget_is_a_piece_alone() -> None:
    lengths = [8, 300, 8, 9]
    pieces = TokenBudget(tokens=32, items=8).pieces(lengths)
    assert [1] in pieces
    assert all(len(piece) == 1 for piece in pieces if 1 in piece)


def test_random_batches_never_pass_the_budget() -> None:
    rng = random.Random(7)
    for _ in range(200):
        budget = TokenBudget(tokens=rng.randint(16, 600), items=rng.randint(1, 40))
        lengths = [rng.randint(1, 256) for _ in range(rng.randint(1, 80))]
        pieces = budget.pieces(lengths)
        assert sorted(k for piece in pieces for k in piece) == list(range(len(lengths)))
        for piece in pieces:
            rows = [lengths[k] for k in piece]
            assert len(piece) == 1 or budget.fits(max(rows), len(rows)), (budget, rows)
            assert rows == sorted(rows) or len(pieces) == 1


def test_results_come_back_in_the_rows_order() -> None:
    rows = ["long text", "a", "medium", "bb", "a much longer text"]
    lengths = [len(r) for r in rows]
    runs: list[list[str]] = []

    def run(piece: list[str]) -> list[str]:
        runs.append(piece)
        return [r.upper() for r in piece]

    out = TokenBudget(tokens=12, items=8).run_in_pieces(rows, lengths, run)
    assert out == [r.upper() for r in rows]
    assert len(runs) > 1  # it did split: 18 x 5 rows is far over 12
    assert runs[0] == ["a", "bb"]


def test_a_run_that_loses_rows_is_an_error() -> None:
    with pytest.raises(ValueError, match="a run of 2 rows returned 1 results"):
        TokenBudget(tokens=None, items=8).run_in_pieces([1, 2], [1, 1], lambda rows: rows[:1])
