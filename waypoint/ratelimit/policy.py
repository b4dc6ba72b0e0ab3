"""The rate-limit configuration: an annotation on an HTTPRoute or VirtualService.

The annotation ``ratelimit.pyambient.io/policy`` holds a YAML (or JSON) mapping
(the schema and the reason for an annotation rather than a new kind are in
``docs/ratelimit.md``)::

    descriptors:                 # what makes two requests share a counter
    - header: x-user-id          # a request header's value (absent -> not limited)
    - sourceIdentity: true       # the peer's SPIFFE identity from HBONE
    - path: true                 # the request path without the query
    - remoteAddress: true        # the downstream address
    local:                       # per replica (token bucket)
      maxTokens: 10
      tokensPerFill: 10          # default: maxTokens
      fillInterval: 60s
    global:                      # shared by every replica through Redis
      requests: 100
      window: 60s                # fixed window starting at its first request
      failMode: open             # open | closed: what to do when Redis cannot answer

The limit applies to every rule of the annotated object.  :func:`descriptor_key`
is the pure extraction; :func:`parse_policy` validates the annotation text.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.api.duration import parse_istio_duration
from common.errors import ConfigError

ANNOTATION = "ratelimit.pyambient.io/policy"


class FailMode(Enum):
    OPEN = "open"
    CLOSED = "closed"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _seconds(value: Any) -> float:
    seconds = parse_istio_duration(value) if isinstance(value, str) else float(value)
    if seconds <= 0:
        raise ValueError("must be a positive duration such as '60s'")
    return seconds


class Descriptor(_Model):
    """One source of the counter key; exactly one field is set."""

    header: str | None = None
    source_identity: bool = Field(False, alias="sourceIdentity")
    path: bool = False
    remote_address: bool = Field(False, alias="remoteAddress")

    @model_validator(mode="after")
    def _one_source(self) -> Descriptor:
        chosen = sum((self.header is not None, self.source_identity, self.path,
                      self.remote_address))
        if chosen != 1:
            raise ValueError("a descriptor names exactly one of header, sourceIdentity, "
                             "path, remoteAddress")
        return self


class LocalLimit(_Model):
    max_tokens: int = Field(alias="maxTokens", ge=1)
    tokens_per_fill: int | None = Field(None, alias="tokensPerFill", ge=1)
    fill_interval: float = Field(alias="fillInterval")

    _interval = field_validator("fill_interval", mode="before")(_seconds)

    @property
    def per_fill(self) -> int:
        return self.tokens_per_fill if self.tokens_per_fill is not None else self.max_tokens


class GlobalLimit(_Model):
    requests: int = Field(ge=1)
    window: float = 60.0
    fail_mode: FailMode = Field(FailMode.OPEN, alias="failMode")

    _window = field_validator("window", mode="before")(_seconds)


class RateLimitPolicy(_Model):
    descriptors: tuple[Descriptor, ...] = ()
    local: LocalLimit | None = None
    global_: GlobalLimit | None = Field(None, alias="global")

    @model_validator(mode="after")
    def _some_limit(self) -> RateLimitPolicy:
        if self.local is None and self.global_ is None:
            raise ValueError("a rate-limit policy needs a 'local' or a 'global' limit")
        return self


def parse_policy(text: str) -> RateLimitPolicy:
    """Validate the annotation's value; :class:`ConfigError` says which field is wrong."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"annotation {ANNOTATION} is not YAML/JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"annotation {ANNOTATION} must be a mapping (see docs/ratelimit.md)")
    try:
        return RateLimitPolicy.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
                             for e in exc.errors())
        raise ConfigError(f"annotation {ANNOTATION}: {problems} "
                          "(schema in docs/ratelimit.md)") from exc


def descriptor_key(policy: RateLimitPolicy, headers: Mapping[str, str], path: str,
                   principal: str | None, remote: str) -> tuple[str, ...] | None:
    """The counter key of one request, or None when a descriptor is missing (as in
    Envoy, a request that cannot produce its descriptor is not limited by it)."""
    key: list[str] = []
    for d in policy.descriptors:
        if d.header is not None:
            value = headers.get(d.header.lower())
            if value is None:
                return None
            key.append(value)
        elif d.source_identity:
            if principal is None:
                return None
            key.append(principal)
        elif d.path:
            key.append(path.split("?", 1)[0])
        else:
            key.append(remote)
    return tuple(key)
