"""Per-request stop criteria."""

from __future__ import annotations

from lorax_server.stopping import FinishReason, StoppingCriteria


def feed(criteria: StoppingCriteria, tokens: list[tuple[int, str]]) -> list[FinishReason | None]:
    return [criteria(t, text) for t, text in tokens]


def test_values_equal_proto_enum() -> None:
    assert (FinishReason.LENGTH, FinishReason.EOS_TOKEN, FinishReason.STOP_SEQUENCE) == (0, 1, 2)


def test_length() -> None:
    c = StoppingCriteria({2}, 3, [], False)
    assert feed(c, [(5, "a"), (6, "b"), (7, "c")]) == [None, None, FinishReason.LENGTH]
    assert c.current_tokens == 3


def test_eos_and_multiple_eos_ids() -> None:
    c = StoppingCriteria({2, 32000}, 10, [], False)
    assert feed(c, [(5, "a"), (32000, "<|eot|>")]) == [None, FinishReason.EOS_TOKEN]
    c = StoppingCriteria({2, 32000}, 10, [], False)
    assert feed(c, [(2, "</s>")]) == [FinishReason.EOS_TOKEN]


def test_eos_wins_over_length() -> None:
    c = StoppingCriteria({2}, 2, [], False)
    assert feed(c, [(5, "a"), (2, "</s>")]) == [None, FinishReason.EOS_TOKEN]


def test_ignore_eos() -> None:
    c = StoppingCriteria({2}, 3, [], True)
    assert feed(c, [(2, "</s>"), (2, "</s>"), (2, "</s>")]) == [None, None, FinishReason.LENGTH]


def test_stop_sequence_within_one_token() -> None:
    c = StoppingCriteria({2}, 10, ["STOP"], False)
    assert feed(c, [(5, "hello"), (6, " xSTOPy")]) == [None, FinishReason.STOP_SEQUENCE]


def test_stop_sequence_across_tokens() -> None:
    c = StoppingCriteria({2}, 20, ["\n\nUser:", "###"], False)
    tokens = [(1, "Hi"), (12, "!\n"), (13, "\n"), (14, "Us"), (15, "er"), (16, ": x")]
    assert feed(c, tokens) == [None, None, None, None, None, FinishReason.STOP_SEQUENCE]
    c = StoppingCriteria({2}, 20, ["###"], False)
    assert feed(c, [(1, "#"), (3, ""), (4, "#"), (5, "#")]) == [None, None, None, FinishReason.STOP_SEQUENCE]


def test_stop_sequence_needs_contiguous_text() -> None:
    c = StoppingCriteria({2}, 20, ["abc"], False)
    assert feed(c, [(1, "ab"), (7, "x"), (3, "bc"), (4, "a"), (5, "b")]) == [None] * 5


def test_stop_sequence_wins_over_length_and_single_char_stops() -> None:
    c = StoppingCriteria({2}, 2, [".", "long stop"], False)
    assert feed(c, [(1, "a"), (3, "b.")]) == [None, FinishReason.STOP_SEQUENCE]
    c = StoppingCriteria({2}, 5, ["!"], False)
    assert feed(c, [(1, "a"), (3, "b"), (4, "c!")]) == [None, None, FinishReason.STOP_SEQUENCE]


def test_tail_is_bounded() -> None:
    c = StoppingCriteria({2}, 10_000, ["abcd"], False)
    for _ in range(1000):
        assert c(3, "xyz" * 10) is None
        assert len(c._tail) <= 3
    assert c(3, "abcd") == FinishReason.STOP_SEQUENCE


def test_empty_stop_sequences_are_ignored() -> None:
    c = StoppingCriteria({2}, 3, [""], False)
    assert feed(c, [(1, "a"), (3, "b"), (4, "c")]) == [None, None, FinishReason.LENGTH]


def test_eos_text_counts_for_stop_sequences_when_ignored() -> None:
    c = StoppingCriteria({2}, 10, ["</s>"], True)
    assert feed(c, [(1, "a"), (2, "</s>")]) == [None, FinishReason.STOP_SEQUENCE]
