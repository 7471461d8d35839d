"""The protocol's text rule and the market's replay of it (pure)."""

from __future__ import annotations

import pytest

from protocol.text import ExpectedText, TextMismatch, TextStream

PIECES = {1: b" hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: "é".encode()[:1], 6: "é".encode()[1:],
          7: b" STOP", 8: b" more"}


def piece(token: int) -> bytes:
    return PIECES[token]


def honest_chunks(ids: list[int], stop: list[str]) -> list[tuple[list[int], str]]:
    stream, out = TextStream(stop), []
    for token in ids:
        delta, stopped = stream.push(piece(token))
        out.append(([token], delta))
        if stopped:
            return out
    tail = stream.flush()
    return out + ([([], tail)] if tail else [])


@pytest.mark.parametrize("ids,stop", [([1, 2, 3, 4], []), ([1, 5, 6, 2], []),
                                      ([1, 2, 7, 8], ["STOP"]), ([1, 2, 3], ["ld"]),
                                      ([1, 2, 3], [" wo"])])
def test_an_honest_stream_replays_exactly(ids, stop) -> None:
    expected = ExpectedText(piece, stop)
    relayed = "".join(expected.chunk(chunk_ids, text) for chunk_ids, text in
                      honest_chunks(ids, stop))
    expected.finish()
    assert relayed == expected.text == "".join(t for _, t in honest_chunks(ids, stop))


def test_text_released_earlier_or_later_by_another_engine_is_accepted() -> None:
    """A different detokenizer may hold text back longer (or less): fine, if it is the
    same text. What the buyer gets is the replay's text either way."""
    later = ExpectedText(piece, [])
    assert later.chunk([1], "") == " hel"  # the node held it; the market relays it anyway
    assert later.chunk([2], " hello") == "lo"
    later.finish()
    assert later.text == " hello"


@pytest.mark.parametrize("frames,why", [
    ([([1], " hel"), ([2], "LO")], "not what its token ids decode"),
    ([([1], " hel"), ([2], "lo"), ([], " free")], "do not decode to"),
    ([([1], " hel"), ([], ""), ([2], "lo")], "after the final text"),
    ([([1], " hel"), ([7], ""), ([8], " more")], "after a stop"),
    ([([1, 7, 8], " hel")], "follow a stop"),
])
def test_text_the_ids_do_not_decode_to_is_refused(frames, why) -> None:
    expected = ExpectedText(piece, ["STOP"])
    with pytest.raises(TextMismatch, match=why):
        for ids, text in frames:
            expected.chunk(ids, text)


def test_a_node_whose_final_text_differs_is_refused_at_the_end() -> None:
    expected = ExpectedText(piece, [])
    expected.chunk([1], "")
    expected.chunk([2], "")  # held everything: consistent so far
    with pytest.raises(TextMismatch, match="ends"):
        expected.finish()  # but never sent it
    assert expected.text == " hello"


def test_a_continuation_is_replayed_after_its_prefix() -> None:
    expected = ExpectedText(piece, [], continuation_ids=[1, 5])  # ends inside "é"
    assert expected.chunk([6], "é") == "é"


def test_a_stop_string_split_across_a_failover_is_still_seen() -> None:
    """The first node held " hel" (it may start the stop " hello") and died; the node
    that continues must release or cut that held text, never lose it."""
    first = TextStream([" hello"])
    assert first.push(piece(1)) == ("", False)  # held
    second = TextStream([" hello"])
    second.prime([piece(1)])  # the continuation: the earlier node's tokens
    assert second.held == " hel"
    assert second.push(piece(2)) == ("", True)  # " hello" completed across the boundary
    third = TextStream([" help"])
    third.prime([piece(1)])
    assert third.push(piece(2)) == (" hello", False)  # not a stop: the held text comes out


def test_stop_strings_are_matched_in_one_pass_whatever_their_length(monkeypatch) -> None:
    """A buyer picks the stop strings and a node the tokens: the work per token must grow
    with the token's characters only, not with the stop strings' length (checking every
    held suffix against every stop prefix made long stops cost ~100 µs a token)."""
    from protocol import text as text_module

    calls = {"n": 0}
    feed = text_module._StopMatcher.feed

    def counted(self, char):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return feed(self, char)

    monkeypatch.setattr(text_module._StopMatcher, "feed", counted)
    for length in (4, 256):
        calls["n"] = 0
        stream = TextStream(["a" * length, " w5" * (length // 3) + "X"])
        for _ in range(1_000):
            stream.push(b" w5")
        assert calls["n"] == 1_000 * 3 * 2  # characters × stop strings, nothing more
