"""HTTP/1.1 as the lean path speaks it, without http.client: a request's bytes, and one response read through a
`recv` function, within bounds.

http.client and urllib3 cost more per small JSON call than the controller's own work per import (header objects
built through the email parser, a buffered file per response, several layers of checks). The API server's answers
are small, framed by Content-Length or chunked, over a kept-alive connection: that is all this module reads. No
sockets, pools or retries here (kubemcsa.client.lean has those); `recv(n)` returns up to n bytes, b"" at the end.
"""

from __future__ import annotations

import http.client
import re
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from urllib3.exceptions import DecodeError, ProtocolError

# The status line and headers of one response (http.client allows 100 lines of 64 KiB; the API server sends ~8).
MAX_HEAD_BYTES = 256 * 1024
MAX_HEADER_FIELDS = 100
# A body: the API server's lists of a large cluster run to hundreds of MB; this only stops a runaway server.
MAX_BODY_BYTES = 1 << 30
# A chunk-size line with its extensions, and a chunked body's trailer section.
MAX_CHUNK_LINE_BYTES = 4096
MAX_TRAILER_BYTES = 64 * 1024
# Interim (1xx) responses skipped before the final one; nothing here asks for them.
MAX_INTERIM_RESPONSES = 8
RECV_BYTES = 64 * 1024

# Body framings.
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = "none", "length", "chunked", "close"

_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})  # an empty one is sent as Content-Length: 0 (as urllib3)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_BAD_TARGET_CHAR = re.compile("[\x00-\x20\x7f]")  # as http.client: no controls or spaces in the request target


class MalformedResponse(ProtocolError):
    """The server's answer breaks HTTP/1.1 framing or one of this module's bounds (one sentence, never a header's
    value)."""


def request_bytes(method: str, target: str, host: str, headers: Mapping[str, str], body: bytes | None) -> bytes:
    """The request line, headers and body of one request, ready for one sendall.

    As http.client and urllib3 write it: Host and Accept-Encoding: identity unless given, Content-Length for a body
    (0 for an empty POST, PUT or PATCH). ValueError if the target or a header would break the framing; the message
    never holds a header's value (it may be a token).
    """
    if _BAD_TARGET_CHAR.search(target):
        raise ValueError("the request path holds a space or a control character; quote it")
    lines = [f"{method} {target} HTTP/1.1"]
    given = {name.lower() for name in headers}
    if "host" not in given:
        lines.append(f"Host: {host}")
    if "accept-encoding" not in given:
        lines.append("Accept-Encoding: identity")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    elif method in _METHODS_WITH_BODY:
        lines.append("Content-Length: 0")
    head = "\r\n".join(lines)
    if head.count("\n") != len(lines) - 1 or head.count("\r") != len(lines) - 1:
        raise ValueError("a request header name or value holds a line break; remove it")
    data = (head + "\r\n\r\n").encode("latin-1")
    return data + body if body else data


@dataclass(slots=True)
class Head:
    """A response's status line and headers, and how its body is framed."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    framing: str
    length: int = 0  # for LENGTH
    keep_alive: bool = True  # the connection may carry the next request once the body is read
    content_encoding: str = ""
    retry_after: bool = False

    def redirect_location(self) -> str | bool:
        """The Location of a redirect, else False (as urllib3's get_redirect_location)."""
        if self.status not in (301, 302, 303, 307, 308):
            return False
        return next((value for name, value in self.headers if name.lower() == "location"), "") or False


class Reader:
    """The bytes of one response as they arrive; `received` counts them (0: the server sent nothing)."""

    __slots__ = ("_data", "_pos", "_recv", "received")

    def __init__(self, recv: Callable[[int], bytes]) -> None:
        self._recv = recv
        self._data = b""
        self._pos = 0
        self.received = 0

    @property
    def leftover(self) -> int:
        """Bytes read past the response: the server sent more than it framed, so the connection is out of step."""
        return len(self._data) - self._pos

    def until(self, terminator: bytes, limit: int, what: str) -> bytes:
        """The bytes up to `terminator` (consumed, not returned), at most `limit` of them. Linear in what arrives,
        however it is cut (a server may trickle a byte at a time)."""
        end = self._data.find(terminator, self._pos)
        if 0 <= end - self._pos <= limit:
            line = self._data[self._pos : end]
            self._pos = end + len(terminator)
            return line
        pieces = [self._data[self._pos :]]
        size = len(pieces[0])
        tail = pieces[0][1 - len(terminator) :]  # a terminator may start in what came before
        self._data, self._pos = b"", 0
        while end < 0 and size <= limit:
            chunk = self._recv(RECV_BYTES)
            if not chunk:
                if self.received == 0:
                    raise http.client.RemoteDisconnected("Remote end closed connection without response")
                raise MalformedResponse(f"the connection closed before the end of the response's {what}")
            self.received += len(chunk)
            window = tail + chunk
            found = window.find(terminator)
            if found >= 0:
                cut = found + len(terminator) - len(tail)  # just past the terminator, in chunk
                pieces.append(chunk[:cut])
                self._data = chunk[cut:]
                line = b"".join(pieces)[: -len(terminator)]
                if len(line) <= limit:
                    return line
                break
            pieces.append(chunk)
            size += len(chunk)
            tail = window[1 - len(terminator) :]
        raise MalformedResponse(f"the response's {what} exceeded {limit} bytes")

    def exactly(self, count: int, what: str) -> bytes:
        available = len(self._data) - self._pos
        if available >= count:
            out = self._data[self._pos : self._pos + count]
            self._pos += count
            return out
        parts = [self._data[self._pos :]]
        missing = count - available
        self._data, self._pos = b"", 0
        while missing > 0:
            chunk = self._recv(RECV_BYTES)
            if not chunk:
                raise MalformedResponse(f"the connection closed {missing} bytes short of the response's {what}")
            self.received += len(chunk)
            if len(chunk) > missing:
                self._data = chunk[missing:]
                chunk = chunk[:missing]
            parts.append(chunk)
            missing -= len(chunk)
        return b"".join(parts)

    def some(self, limit: int) -> bytes:
        """What is buffered, else what one recv gives: at most `limit` bytes, b"" once the server closed."""
        if self._pos < len(self._data):
            piece = self._data[self._pos : self._pos + limit]
            self._pos += len(piece)
            return piece
        chunk = self._recv(RECV_BYTES)
        self.received += len(chunk)
        if len(chunk) > limit:
            self._data, self._pos = chunk, limit
            return chunk[:limit]
        self._data, self._pos = b"", 0
        return chunk

    def rest(self, limit: int) -> bytes:
        """Everything until the server closes the connection, at most `limit` bytes."""
        parts = [self._data[self._pos :]]
        size = len(parts[0])
        self._data, self._pos = b"", 0
        while size <= limit and (chunk := self._recv(RECV_BYTES)):
            self.received += len(chunk)
            size += len(chunk)
            parts.append(chunk)
        if size > limit:
            raise MalformedResponse(f"the response's body exceeded {limit} bytes")
        return b"".join(parts)


def read_head(reader: Reader, method: str, *, max_head_bytes: int = MAX_HEAD_BYTES) -> Head:
    """The final response's head (interim 1xx ones skipped). RemoteDisconnected if the server sent nothing at all,
    MalformedResponse for anything that is not HTTP/1.1 within bounds, the recv function's own errors as they come.
    """
    for _ in range(MAX_INTERIM_RESPONSES + 1):
        head = parse_head(reader.until(b"\r\n\r\n", max_head_bytes, "headers"), method)
        if head is not None:
            return head
    raise MalformedResponse(f"the server sent more than {MAX_INTERIM_RESPONSES} interim (1xx) responses")


def parse_head(block: bytes, method: str) -> Head | None:
    """The head of a status line and header lines (CRLF-separated, without the blank line); None for an interim
    (1xx) response, which the final one follows."""
    text = block.decode("latin-1")
    lines = text.split("\r\n")
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise MalformedResponse("the response holds a bare CR or LF; the server does not speak HTTP/1.1")
    if len(lines) - 1 > MAX_HEADER_FIELDS:
        raise MalformedResponse(f"the response has more than {MAX_HEADER_FIELDS} header fields")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not (code.isascii() and code.isdigit()):
        raise MalformedResponse("the response does not start with an HTTP/1.x status line")
    status = int(code)
    if status < 100:
        raise MalformedResponse(f"the response's status {code} is not an HTTP status")
    if status == 101:
        raise MalformedResponse("the server switched protocols, which this client never asks for")
    headers: list[tuple[str, str]] = []
    lengths: set[str] = set()
    transfer_coding = connection = encoding = ""
    retry_after = False
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise MalformedResponse("a response header line is not `name: value`")
        value = value.strip(" \t")
        headers.append((name, value))
        lower = name.lower()
        if lower == "content-length":
            lengths.update(part.strip(" \t") for part in value.split(","))
        elif lower == "transfer-encoding":
            transfer_coding = f"{transfer_coding},{value}" if transfer_coding else value
        elif lower == "connection":
            connection = f"{connection},{value}" if connection else value
        elif lower == "content-encoding":
            encoding = value.lower()
        elif lower == "retry-after":
            retry_after = bool(value)
    if 100 <= status < 200:
        return None
    tokens = {token.strip(" \t").lower() for token in connection.split(",")} if connection else set()
    keep_alive = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens
    head = Head(status, reason, headers, LENGTH, 0, keep_alive, encoding, retry_after)
    if method == "HEAD" or status in (204, 304):
        head.framing = NO_BODY
    elif transfer_coding:
        if transfer_coding.strip(" \t").lower() != "chunked":
            raise MalformedResponse("the response's transfer coding is not plain chunked, the only one supported")
        head.framing = CHUNKED
        head.keep_alive = head.keep_alive and not lengths  # both framings: a confused (or smuggling) peer
    elif lengths:
        length = lengths.pop() if len(lengths) == 1 else ""  # repeated, it must say the same each time
        if not (length.isascii() and length.isdigit()) or len(length) > 15:
            raise MalformedResponse("the response's Content-Length is not one decimal number")
        head.length = int(length)
    else:
        head.framing = UNTIL_CLOSE
        head.keep_alive = False
    return head


def read_body(reader: Reader, head: Head, *, max_body_bytes: int = MAX_BODY_BYTES) -> bytes:
    """The body as `head` frames it, decoded if the server compressed it (gzip, deflate) although asked not to;
    MalformedResponse if it breaks its framing or exceeds `max_body_bytes` (before it is read, when it says so)."""
    if head.framing == NO_BODY:
        return b""
    if head.framing == LENGTH:
        if head.length > max_body_bytes:
            raise MalformedResponse(f"the response's body exceeded {max_body_bytes} bytes")
        body = reader.exactly(head.length, "body")
    elif head.framing == CHUNKED:
        body = _chunked(reader, max_body_bytes)
    else:
        body = reader.rest(max_body_bytes)
    if head.content_encoding in ("gzip", "x-gzip", "deflate") and body:
        return _decoded(body, head.content_encoding, max_body_bytes)
    return body


def body_pieces(reader: Reader, head: Head) -> Iterator[bytes]:
    """The body as `head` frames it, a piece at a time as it arrives (each chunk of a chunked body: a watch's
    event), decoded if the server compressed it although asked not to. Ends at the body's end (a framing error
    raises MalformedResponse); a stream has no size bound here, its reader bounds what it keeps."""
    pieces = _raw_pieces(reader, head)
    if head.content_encoding in ("gzip", "x-gzip", "deflate"):
        return _decompressed(pieces, head.content_encoding)
    return pieces


def _raw_pieces(reader: Reader, head: Head) -> Iterator[bytes]:
    if head.framing == NO_BODY:
        return
    if head.framing == LENGTH:
        left = head.length
        while left > 0:
            piece = reader.some(min(left, RECV_BYTES))
            if not piece:
                raise MalformedResponse(f"the connection closed {left} bytes short of the response's body")
            left -= len(piece)
            yield piece
        return
    if head.framing == UNTIL_CLOSE:
        while piece := reader.some(RECV_BYTES):
            yield piece
        return
    while True:
        size = _chunk_size(reader)
        if size == 0:
            break
        while size > 0:  # a large chunk in pieces of what arrives, not held whole
            piece = reader.some(min(size, RECV_BYTES))
            if not piece:
                raise MalformedResponse("the connection closed before the end of the response's body")
            size -= len(piece)
            yield piece
        if reader.exactly(2, "body") != b"\r\n":
            raise MalformedResponse("a chunk of the response does not end where its size says")
    _skip_trailers(reader)


def _decompressed(pieces: Iterator[bytes], encoding: str) -> Iterator[bytes]:
    decoder = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS)
    try:
        for piece in pieces:
            while piece:
                out = decoder.decompress(piece, RECV_BYTES)  # bounded per step, however well it compresses
                piece = decoder.unconsumed_tail
                if out:
                    yield out
    except zlib.error as exc:
        raise DecodeError(f"Received response with content-encoding: {encoding}, but failed to decode it.") from exc


def _chunk_size(reader: Reader) -> int:
    line = reader.until(b"\r\n", MAX_CHUNK_LINE_BYTES, "chunk size line")
    digits = line.split(b";", 1)[0].rstrip(b" \t")
    if not _HEX.fullmatch(digits):
        raise MalformedResponse("a chunk size of the response is not a hexadecimal number")
    return int(digits, 16)


def _skip_trailers(reader: Reader) -> None:
    trailers = 0
    while line := reader.until(b"\r\n", MAX_TRAILER_BYTES, "trailers"):
        trailers += len(line) + 2
        if trailers > MAX_TRAILER_BYTES:
            raise MalformedResponse(f"the response's trailers exceeded {MAX_TRAILER_BYTES} bytes")


def _chunked(reader: Reader, max_body_bytes: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        chunk_size = _chunk_size(reader)
        if chunk_size == 0:
            break
        size += chunk_size
        if size > max_body_bytes:
            raise MalformedResponse(f"the response's body exceeded {max_body_bytes} bytes")
        parts.append(reader.exactly(chunk_size, "body"))
        if reader.exactly(2, "body") != b"\r\n":
            raise MalformedResponse("a chunk of the response does not end where its size says")
    _skip_trailers(reader)
    return b"".join(parts)


def _decoded(body: bytes, encoding: str, max_body_bytes: int) -> bytes:
    wbits = 16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS
    try:
        try:
            decoder = zlib.decompressobj(wbits)
            data = decoder.decompress(body, max_body_bytes + 1)
        except zlib.error:
            if encoding != "deflate":
                raise
            decoder = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as some servers send (and urllib3 reads)
            data = decoder.decompress(body, max_body_bytes + 1)
    except zlib.error as exc:
        raise DecodeError(f"Received response with content-encoding: {encoding}, but failed to decode it.") from exc
    if len(data) > max_body_bytes or decoder.unconsumed_tail:
        raise MalformedResponse(f"the response's body decompresses to more than {max_body_bytes} bytes")
    return data
