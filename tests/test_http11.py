"""kubemcsa.client.http11, the lean path's HTTP/1.1: the request it writes, and the responses it reads, good and bad.

A response is fed through a `recv` over bytes, cut anywhere: it must parse the same however it arrives, and bad
input must end in MalformedResponse (or RemoteDisconnected when nothing came), never in a hang or another error.
"""

from __future__ import annotations

import gzip
import http.client
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from urllib3.exceptions import DecodeError, ProtocolError

from kubemcsa.client import http11
from kubemcsa.client.http11 import MalformedResponse


def feeder(data: bytes, cuts: list[int] | None = None):
    """A recv over `data`, cut at `cuts` (else whole), then b"" (the server closed) forever."""
    pieces: list[bytes] = []
    start = 0
    for cut in sorted(set(cuts or [])):
        if start < cut < len(data):
            pieces.append(data[start:cut])
            start = cut
    pieces.append(data[start:])
    pieces = [piece for piece in pieces if piece]

    def recv(size: int) -> bytes:
        assert size > 0
        if not pieces:
            return b""
        piece = pieces.pop(0)
        if len(piece) > size:
            pieces.insert(0, piece[size:])
            piece = piece[:size]
        return piece

    return recv


def read(data: bytes, cuts: list[int] | None = None, method: str = "GET", **limits: int):
    """(head, body, leftover) of the one response in `data`."""
    reader = http11.Reader(feeder(data, cuts))
    head = http11.read_head(reader, method, **{k: v for k, v in limits.items() if k == "max_head_bytes"})
    body = http11.read_body(reader, head, **{k: v for k, v in limits.items() if k == "max_body_bytes"})
    return head, body, reader.leftover


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, pos = b"", 0
    for size in sizes:
        if pos >= len(body):
            break
        piece = body[pos : pos + max(1, size)]
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
        pos += len(piece)
    if pos < len(body):
        out += b"%x\r\n%s\r\n" % (len(body) - pos, body[pos:])
    return out + b"0\r\n\r\n"


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


# --- the request -------------------------------------------------------------------------------------------------


def test_a_request_is_written_as_http_client_writes_it():
    data = http11.request_bytes(
        "POST", "/api/v1/namespaces/a/secrets", "10.0.0.1:6443", {"Authorization": "Bearer t"}, b'{"a":1}'
    )
    assert data == (
        b"POST /api/v1/namespaces/a/secrets HTTP/1.1\r\nHost: 10.0.0.1:6443\r\nAccept-Encoding: identity\r\n"
        b'Authorization: Bearer t\r\nContent-Length: 7\r\n\r\n{"a":1}'
    )
    assert http11.request_bytes("POST", "/x", "h", {}, None).endswith(b"Content-Length: 0\r\n\r\n")
    assert b"Content-Length" not in http11.request_bytes("GET", "/x", "h", {}, None)
    given_host = http11.request_bytes("GET", "/x", "h", {"host": "other", "Accept-Encoding": "gzip"}, None)
    assert b"Host: h" not in given_host and b"identity" not in given_host


@pytest.mark.parametrize("value", ["secret\r\nX-Injected: 1", "secret\n", "secret\rx"])
def test_a_header_that_would_break_the_framing_is_refused_without_its_value(value):
    with pytest.raises(ValueError) as info:
        http11.request_bytes("GET", "/x", "h", {"Authorization": value}, None)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("target", ["/a b", "/a\r\nHost: evil", "/a\x00"])
def test_a_target_with_spaces_or_controls_is_refused(target):
    with pytest.raises(ValueError):
        http11.request_bytes("GET", target, "h", {}, None)


# --- good responses, however they arrive -------------------------------------------------------------------------

header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC-", min_size=1, max_size=12).filter(
    lambda name: name.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")
)
header_values = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)


@settings(max_examples=300, deadline=None)
@given(
    status=st.integers(200, 599).filter(lambda s: s not in (204, 304)),
    headers=st.lists(st.tuples(header_names, header_values), max_size=8),
    body=st.binary(max_size=3000),
    framing=st.sampled_from(["length", "chunked"]),
    sizes=st.lists(st.integers(1, 700), max_size=8),
    cuts=st.lists(st.integers(0, 4000), max_size=12),
)
def test_a_framed_response_reads_back_whole_however_it_is_cut(status, headers, body, framing, sizes, cuts):
    head_lines = b"".join(f"{name}: {value}\r\n".encode() for name, value in headers)
    if framing == "length":
        wire = b"HTTP/1.1 %d Some Reason\r\n%sContent-Length: %d\r\n\r\n%s" % (status, head_lines, len(body), body)
    else:
        wire = b"HTTP/1.1 %d Some Reason\r\n%sTransfer-Encoding: chunked\r\n\r\n%s" % (
            status,
            head_lines,
            chunked(body, sizes),
        )
    head, read_body, leftover = read(wire, cuts)
    assert (head.status, head.reason, read_body, leftover) == (status, "Some Reason", body, 0)
    assert head.headers[: len(headers)] == [(name, value.strip()) for name, value in headers]
    assert head.keep_alive


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=10),
    method=st.sampled_from(["GET", "HEAD"]),
)
def test_any_bytes_end_in_a_response_or_a_protocol_error(data, cuts, method):
    try:
        read(data, cuts, method)
    except (ProtocolError, DecodeError, http.client.RemoteDisconnected):
        pass


def corrupted(wire: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """`wire` with a few bytes inserted, deleted or replaced anywhere."""
    for at, action, data in edits:
        at %= len(wire) + 1
        if action == 0:
            wire = wire[:at] + data + wire[at:]
        elif action == 1:
            wire = wire[:at] + wire[at + len(data) + 1 :]
        else:
            wire = wire[:at] + data + wire[at + len(data) :]
    return wire


def _valid(body: bytes, framing: str) -> bytes:
    if framing == "chunked":
        return OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, [7, 50])
    return OK_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


@settings(max_examples=400, deadline=None)
@given(
    body=st.binary(max_size=400),
    framing=st.sampled_from(["length", "chunked"]),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 2), st.binary(max_size=6)), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 600), max_size=6),
)
def test_a_corrupted_response_is_refused_or_read_as_framed(body, framing, edits, cuts):
    wire = _valid(body, framing)
    try:
        read(corrupted(wire, edits), cuts)
    except (ProtocolError, DecodeError, http.client.RemoteDisconnected):
        pass


def test_interim_responses_are_skipped_and_no_body_statuses_have_none():
    head, body, _ = read(b"HTTP/1.1 100 Continue\r\n\r\n" + OK_HEAD + b"Content-Length: 2\r\n\r\nok")
    assert (head.status, body) == (200, b"ok")
    for status in (204, 304):
        head, body, leftover = read(b"HTTP/1.1 %d X\r\n\r\n" % status)
        assert (head.status, body, leftover) == (status, b"", 0)
    head, body, leftover = read(OK_HEAD + b"Content-Length: 5\r\n\r\n", method="HEAD")
    assert (body, leftover, head.keep_alive) == (b"", 0, True)


def test_what_says_the_connection_cannot_carry_the_next_request():
    assert not read(OK_HEAD + b"Connection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n")[0].keep_alive
    assert not read(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")[0].keep_alive
    assert read(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")[0].keep_alive
    # Both framings: chunked wins (RFC 9112), and the peer is not trusted with another request.
    head, body, _ = read(OK_HEAD + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"abcdef", [2]))
    assert (body, head.keep_alive) == (b"abcdef", False)
    # No framing: the body runs until the server closes.
    head, body, _ = read(OK_HEAD + b"\r\nuntil the end")
    assert (body, head.keep_alive) == (b"until the end", False)
    # More than the framing said: the connection is out of step.
    assert read(OK_HEAD + b"Content-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")[2] > 0


def test_a_repeated_content_length_that_agrees_is_read():
    assert read(OK_HEAD + b"Content-Length: 2\r\nContent-Length: 2, 2\r\n\r\nok")[1] == b"ok"


def test_trailers_and_chunk_extensions_are_skipped():
    wire = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n3;name=value\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
    _, body, leftover = read(wire)
    assert (body, leftover) == (b"abc", 0)


def test_a_compressed_body_is_decoded_within_the_bound():
    document = b'{"items":[' + b'{"a":1},' * 1000 + b"{}]}"
    for encoding, packed in (
        ("gzip", gzip.compress(document)),
        ("deflate", zlib.compress(document)),
        ("deflate", zlib.compress(document, wbits=-15)),
    ):
        wire = OK_HEAD + b"Content-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            encoding.encode(),
            len(packed),
            packed,
        )
        assert read(wire)[1] == document
    bomb = gzip.compress(b"\0" * 200_000)
    wire = OK_HEAD + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(bomb), bomb)
    with pytest.raises(MalformedResponse, match="decompresses to more than"):
        read(wire, max_body_bytes=100_000)


def test_a_head_trickled_a_byte_at_a_time_is_read():
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 500) for i in range(60))
    wire = OK_HEAD + filler + b"Content-Length: 2\r\n\r\nok"
    head, body, _ = read(wire, cuts=list(range(len(wire))))
    assert (len(head.headers), body) == (62, b"ok")


# --- bad responses -----------------------------------------------------------------------------------------------


def test_nothing_at_all_is_a_remote_disconnect():
    with pytest.raises(http.client.RemoteDisconnected):
        read(b"")


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Type: a", "before the end of the response's headers"),
        (OK_HEAD + b"Content-Length: 10\r\n\r\nshort", "5 bytes short of the response's body"),
        (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nab", "short of the response's body"),
        (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n", "before the end of the response's chunk size"),
        (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX: 1\r\n", "before the end of the response's trailers"),
    ],
)
def test_a_truncated_response_is_refused(wire, problem):
    with pytest.raises(MalformedResponse, match=problem):
        read(wire)
    with pytest.raises(MalformedResponse, match=problem):
        read(wire, cuts=list(range(0, len(wire), 3)))


@pytest.mark.parametrize(
    "size_line",
    [b"-1", b"0x10", b"zz", b" 5", b"5 5", b"1_0", b"+5", b"", b"ffffffffffffffffff", b"\xd9\xa5"],
)
def test_a_bad_chunk_size_is_refused(size_line):
    wire = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + size_line + b"\r\n" + b"a" * 20 + b"\r\n0\r\n\r\n"
    with pytest.raises(MalformedResponse, match="not a hexadecimal number"):
        read(wire)


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n", "does not end where its size says"),
        (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 5000 + b"\r\n", "chunk size line exceeded"),
        (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"fffffffff\r\n", "body exceeded"),
        (OK_HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n", "not plain chunked"),
        (OK_HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nabc", "not one decimal number"),
        (OK_HEAD + b"Content-Length: -1\r\n\r\n", "not one decimal number"),
        (OK_HEAD + b"Content-Length: \xd9\xa1\r\n\r\n", "not one decimal number"),
        (OK_HEAD + b"Content-Length: 99999999999\r\n\r\n", "body exceeded"),
        (b"HTTP/2 200 OK\r\n\r\n", "HTTP/1.x status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "HTTP/1.x status line"),
        (b"HTTP/1.1 \xb2\xb2\xb2 OK\r\n\r\n", "HTTP/1.x status line"),
        (b"HTTP/1.1 099 Low\r\n\r\n", "not an HTTP status"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", "switched protocols"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "HTTP/1.x status line"),
        (OK_HEAD + b"Bare: lf\nContent-Length: 0\r\n\r\n", "bare CR or LF"),
        (OK_HEAD + b" folded: value\r\nContent-Length: 0\r\n\r\n", "not `name: value`"),
        (OK_HEAD + b"Name : value\r\n\r\n", "not `name: value`"),
        (OK_HEAD + b"no colon\r\n\r\n", "not `name: value`"),
        (OK_HEAD + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n", "more than 100 header fields"),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 9 + OK_HEAD + b"\r\n", "interim"),
    ],
)
def test_a_malformed_response_is_refused(wire, problem):
    with pytest.raises(MalformedResponse, match=problem):
        read(wire)


def test_oversize_headers_are_refused_whether_or_not_they_end():
    huge = OK_HEAD + b"X-Big: " + b"v" * 300_000
    with pytest.raises(MalformedResponse, match="headers exceeded 262144 bytes"):
        read(huge + b"\r\n\r\n")
    with pytest.raises(MalformedResponse, match="headers exceeded 262144 bytes"):
        read(huge, cuts=list(range(0, len(huge), 1000)))  # no end: refused once the bound is passed
    with pytest.raises(MalformedResponse, match="headers exceeded 100 bytes"):
        read(OK_HEAD + b"X: " + b"v" * 100 + b"\r\n\r\n", max_head_bytes=100)


def test_a_body_past_the_bound_is_refused_however_it_is_framed():
    with pytest.raises(MalformedResponse, match="body exceeded 10 bytes"):
        read(OK_HEAD + b"Content-Length: 11\r\n\r\n" + b"a" * 11, max_body_bytes=10)
    with pytest.raises(MalformedResponse, match="body exceeded 10 bytes"):
        read(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b"a" * 11, [5]), max_body_bytes=10)
    with pytest.raises(MalformedResponse, match="body exceeded 10 bytes"):
        read(OK_HEAD + b"\r\n" + b"a" * 11, max_body_bytes=10)


# --- a body read as it arrives (a watch) --------------------------------------------------------------------------


def pieces_of(data: bytes, cuts: list[int] | None = None) -> tuple[http11.Head, list[bytes], int]:
    reader = http11.Reader(feeder(data, cuts))
    head = http11.read_head(reader, "GET")
    return head, list(http11.body_pieces(reader, head)), reader.leftover


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=3000),
    framing=st.sampled_from(["length", "chunked", "close"]),
    sizes=st.lists(st.integers(1, 700), max_size=8),
    cuts=st.lists(st.integers(0, 4000), max_size=12),
)
def test_a_body_read_as_it_arrives_is_the_body_read_whole(body, framing, sizes, cuts):
    if framing == "length":
        wire = OK_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    elif framing == "chunked":
        wire = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, sizes)
    else:
        wire = OK_HEAD + b"\r\n" + body
    head, pieces, leftover = pieces_of(wire, cuts)
    assert (b"".join(pieces), leftover) == (body, 0)
    assert all(len(piece) <= http11.RECV_BYTES for piece in pieces)
    assert head.keep_alive == (framing != "close")


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=400),
    framing=st.sampled_from(["length", "chunked"]),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 2), st.binary(max_size=6)), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 600), max_size=6),
)
def test_a_corrupted_stream_ends_in_a_protocol_error_or_its_framed_bytes(body, framing, edits, cuts):
    try:
        pieces_of(corrupted(_valid(body, framing), edits), cuts)
    except (ProtocolError, DecodeError, http.client.RemoteDisconnected):
        pass


def test_a_compressed_stream_is_decoded_in_bounded_steps():
    body = b'{"type":"ADDED"}\n' * 20_000  # compresses a thousandfold: each step still yields at most RECV_BYTES
    framed = chunked(gzip.compress(body), [99])
    wire = OK_HEAD + b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" + framed
    _, pieces, _ = pieces_of(wire)
    assert b"".join(pieces) == body and max(len(piece) for piece in pieces) <= http11.RECV_BYTES
    with pytest.raises(DecodeError):
        pieces_of(OK_HEAD + b"Content-Encoding: gzip\r\nContent-Length: 5\r\n\r\nnot z")
