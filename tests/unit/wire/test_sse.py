import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.wire.sse import SSEParser, SSEProtocolError


def parse_all(pieces):
    parser = SSEParser(max_event_bytes=1 << 20)
    out = []
    for piece in pieces:
        out.extend(parser.feed(piece))
    tail = parser.close()
    if tail is not None:
        out.append(tail)
    return out


def test_events_and_done():
    stream = b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'
    assert parse_all([stream]) == [b'{"a":1}', b'{"b":2}', b"[DONE]"]


def test_crlf_comments_and_multiline():
    stream = b": keep-alive\r\n\r\nevent: x\r\ndata: line1\r\ndata: line2\r\n\r\n"
    assert parse_all([stream]) == [b"line1\nline2"]


def test_event_without_final_blank_line_is_returned_at_close():
    assert parse_all([b"data: last"]) == [b"last"]


def test_oversized_line_is_refused():
    parser = SSEParser(max_event_bytes=16)
    with pytest.raises(SSEProtocolError):
        list(parser.feed(b"data: " + b"x" * 64))


def test_oversized_multiline_event_is_refused():
    parser = SSEParser(max_event_bytes=16)
    with pytest.raises(SSEProtocolError):
        list(parser.feed(b"data: 0123456789\ndata: 0123456789\n"))


events = st.lists(
    st.text(
        alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
        max_size=40,
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(events, st.data())
def test_any_split_gives_the_same_events(payloads, data):
    """Backends' bytes arrive cut anywhere, even inside a UTF-8 character."""
    stream = b"".join(b"data: " + p.encode() + b"\n\n" for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    pieces, last = [], 0
    for cut in cuts:
        pieces.append(stream[last:cut])
        last = cut
    pieces.append(stream[last:])
    expected = [
        p.encode() for p in payloads if p.encode()
    ]  # "data: " alone carries an empty payload
    got = parse_all(pieces)
    assert [g for g in got if g] == expected


sse_bytes = st.lists(
    st.sampled_from(
        [b"data: ", b"data:", b"event: x", b": c", b"\n", b"\r", b"\n\n", b"ab", b"{}"]
    ),
    max_size=24,
).map(b"".join)
# Most shaped like a whole read ("data: ...\n\n"), where the shortcut is tried.
sse_reads = st.one_of(sse_bytes, sse_bytes.map(lambda middle: b"data: " + middle + b"\n\n"))


@settings(max_examples=300, deadline=None)
@given(sse_reads)
def test_reads_of_whole_events_parse_as_byte_by_byte(stream):
    """The shortcut for reads of whole one-line events gives what the line parser gives."""
    whole = parse_all([stream, stream])
    assert whole == parse_all([stream[i : i + 1] for i in range(len(stream))] * 2)


def test_a_whole_read_over_the_limit_is_refused():
    parser = SSEParser(max_event_bytes=16)
    with pytest.raises(SSEProtocolError):
        parser.feed(b"data: " + b"x" * 64 + b"\n\n")
