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
    ([([1], " hel"), ([2], "lo"), ([], " free")], "final text"),
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
