"""Reading the protobuf bodies kubectl's generators send, for the few kinds they create.

``kubectl create namespace|serviceaccount|secret|deployment`` encode the new object in Kubernetes'
protobuf envelope: the magic ``k8s\\0``, then a ``runtime.Unknown`` message holding
TypeMeta (apiVersion 1, kind 2) and the object's own message as bytes (field 2).  Only the
fields those generators fill are mapped here; any other kind is refused with 415, as is
every protobuf body we cannot read, and clients can send JSON instead.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

MAGIC = b"k8s\x00"

Decoder = Callable[[int | bytes], Any]


class ProtobufError(ValueError):
    """A body that is not the protobuf this module reads."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ProtobufError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of one message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            yield number, value
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ProtobufError("truncated field")
            yield number, data[pos:pos + length]
            pos += length
        elif wire in (1, 5):  # fixed64 / fixed32: not used by the fields read here
            pos += 8 if wire == 1 else 4
        else:
            raise ProtobufError(f"unsupported wire type {wire}")


def _bytes(raw: int | bytes) -> bytes:
    if not isinstance(raw, bytes):
        raise ProtobufError("expected a length-delimited field, got a number")
    return raw


def _text(raw: int | bytes) -> str:
    return _bytes(raw).decode()


def _entry(raw: int | bytes, value_of: Decoder) -> tuple[str, Any]:
    entry = dict(fields(_bytes(raw)))
    return _text(entry.get(1, b"")), value_of(entry.get(2, b""))


def _message(schema: dict[int, tuple[str, str, Decoder]]) -> Decoder:
    """A decoder for a message; schema: number -> (json name, shape, decoder), where shape
    is "one" (a field), "list" (repeated) or "map" (map entries)."""
    def decode(raw: int | bytes) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for number, value in fields(_bytes(raw)):
            if number not in schema:
                continue
            name, shape, decoder = schema[number]
            if shape == "map":
                key, item = _entry(value, decoder)
                out.setdefault(name, {})[key] = item
            elif shape == "list":
                out.setdefault(name, []).append(decoder(value))
            else:
                out[name] = decoder(value)
        return {k: v for k, v in out.items() if v is not None and v not in ("", {}, [])}
    return decode


def _bool(raw: int | bytes) -> bool | None:
    return True if raw else None  # false is the default: left out, as JSON clients do


def _int(raw: int | bytes) -> int:
    if not isinstance(raw, int):
        raise ProtobufError("expected a number field")
    return raw


def _b64(raw: int | bytes) -> str:
    return base64.b64encode(_bytes(raw)).decode()


_META = _message({1: ("name", "one", _text), 2: ("generateName", "one", _text),
                  3: ("namespace", "one", _text), 11: ("labels", "map", _text),
                  12: ("annotations", "map", _text)})
_CONTAINER = _message({
    1: ("name", "one", _text), 2: ("image", "one", _text), 3: ("command", "list", _text),
    4: ("args", "list", _text), 5: ("workingDir", "one", _text),
    6: ("ports", "list", _message({1: ("name", "one", _text),
                                   3: ("containerPort", "one", _int),
                                   4: ("protocol", "one", _text)})),
    7: ("env", "list", _message({1: ("name", "one", _text), 2: ("value", "one", _text)})),
})
_POD_SPEC = _message({2: ("containers", "list", _CONTAINER),
                      8: ("serviceAccountName", "one", _text), 10: ("nodeName", "one", _text),
                      11: ("hostNetwork", "one", _bool)})
_KINDS: dict[str, Decoder] = {
    "Namespace": _message({1: ("metadata", "one", _META),
                           2: ("spec", "one", _message({1: ("finalizers", "list", _text)}))}),
    "ServiceAccount": _message({1: ("metadata", "one", _META),
                                4: ("automountServiceAccountToken", "one", _bool)}),
    "Secret": _message({1: ("metadata", "one", _META), 2: ("data", "map", _b64),
                        3: ("type", "one", _text), 4: ("stringData", "map", _text),
                        5: ("immutable", "one", _bool)}),
    "Deployment": _message({1: ("metadata", "one", _META), 2: ("spec", "one", _message({
        1: ("replicas", "one", _int),
        2: ("selector", "one", _message({1: ("matchLabels", "map", _text)})),
        3: ("template", "one", _message({1: ("metadata", "one", _META),
                                         2: ("spec", "one", _POD_SPEC)})),
    }))}),
}


def decode(body: bytes) -> dict[str, Any]:
    """The JSON form of a protobuf-encoded object; ProtobufError if it cannot be read."""
    if not body.startswith(MAGIC):
        raise ProtobufError("missing the k8s protobuf magic prefix")
    envelope = dict(fields(body[len(MAGIC):]))
    type_meta = dict(fields(_bytes(envelope.get(1, b""))))
    api_version, kind = _text(type_meta.get(1, b"")), _text(type_meta.get(2, b""))
    decoder = _KINDS.get(kind)
    if decoder is None:
        raise ProtobufError(f"protobuf bodies are read for {', '.join(_KINDS)} only, not {kind}")
    obj: dict[str, Any] = {"apiVersion": api_version, "kind": kind}
    obj.update(decoder(envelope.get(2, b"")))
    return obj
