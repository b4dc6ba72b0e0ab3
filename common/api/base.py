"""The pydantic base of every API spec model: camelCase on the wire, frozen, strict about fields.

Unknown fields are an error (``extra="forbid"``): a misspelt ``retryOn`` that was
silently dropped would change behaviour without a trace, and the per-object error
names the field so an operator finds it.  Models are frozen so a parsed spec can
be shared by snapshots without copying.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from common.api.duration import parse_gateway_duration, parse_istio_duration
from common.errors import ConfigError


class ApiModel(BaseModel):
    """Base for spec models: camelCase aliases, snake_case attributes, frozen, no extras."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True,
                              extra="forbid")


def _checked(parse: Any) -> Any:
    def check(value: str) -> str:
        try:
            parse(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return value
    return check


#: A Go-syntax duration string (Istio), validated but kept as written.
IstioDuration = Annotated[str, AfterValidator(_checked(parse_istio_duration))]
#: A GEP-2257 duration string (Gateway API), validated but kept as written.
GatewayDuration = Annotated[str, AfterValidator(_checked(parse_gateway_duration))]


def field_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """Flatten a pydantic error into ``(field path, message)`` pairs, paths in wire names.

    Paths look like ``spec.rules[0].matches[1].path.type`` so they can go into a
    status condition as they are.
    """
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        path = "spec"
        for part in err["loc"]:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field (check the spelling and the API version)"
        out.append((path, message))
    return out
