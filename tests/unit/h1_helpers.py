"""Helpers for the HTTP/1.1 codec tests: drive a parser over chunks, compare events."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from waypoint.http import Data, EndOfMessage, Event, H1Limits, RequestParser, ResponseParser

Parser = RequestParser | ResponseParser


def normalize(events: Iterable[Event]) -> list[Event]:
    """Events with adjacent Data merged into one ``bytes`` piece (chunking is not meaning)
    and trailers as a tuple, so that two runs compare equal."""
    out: list[Event] = []
    for ev in events:
        if isinstance(ev, Data):
            piece = bytes(ev.data)
            if not piece:
                continue
            if out and isinstance(out[-1], Data):
                out[-1] = Data(bytes(out[-1].data) + piece)
            else:
                out.append(Data(piece))
        elif isinstance(ev, EndOfMessage):
            out.append(EndOfMessage(tuple(ev.trailers)))
        else:
            out.append(ev)
    return out


def run(parser: Parser, chunks: Iterable[bytes], eof: bool = False) -> list[Event]:
    """Feed every chunk, collecting events after each; optionally end with EOF."""
    out: list[Event] = []
    for chunk in chunks:
        parser.feed(chunk)
        out.extend(drain(parser))
    if eof:
        parser.feed_eof()
        out.extend(drain(parser))
    return normalize(out)


def drain(parser: Parser) -> list[Event]:
    """Every event available, raising an error deferred by ``events()``."""
    out: list[Event] = []
    while batch := parser.events():
        out.extend(batch)
    return out


def new_parser(kind: str, methods: Sequence[bytes] = (), limits: H1Limits | None = None
               ) -> Parser:
    """A request parser, or a response parser expecting responses to ``methods``."""
    parser: Parser
    if kind == "request":
        parser = RequestParser(limits) if limits else RequestParser()
    else:
        parser = ResponseParser(limits) if limits else ResponseParser()
        for method in methods:
            parser.expect_response(method)
    return parser


def bytewise(data: bytes) -> list[bytes]:
    """``data`` one byte per chunk."""
    return [data[i:i + 1] for i in range(len(data))]
