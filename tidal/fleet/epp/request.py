"""The EPP's seam types (docs/fleet.md seam 3): `RoutingRequest` in, `Decision` out, `RejectedError`.

Owns: these three shapes and the OpenAI-style error body a rejection carries, so the ext_proc
server can answer with `status` and `body()` as they are.
Must not: hold any routing logic or import the rest of the EPP.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

_ERROR_TYPES = {404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable_error"}


@dataclass
class RoutingRequest:
    path: str                                            # e.g. /v1/chat/completions
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: dict | None = None                             # the parsed JSON body, or None (headers-only phase)

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return value.strip() if isinstance(value, str) and value.strip() else None


@dataclass
class Decision:
    endpoint: str                                 # "host:port"
    scores: dict[str, dict[str, float]]           # endpoint -> scorer name -> 0..1 (plus "total": weighted sum)
    fallbacks: list[str] = field(default_factory=list)   # other endpoints, best first, for one retry
    prefix_blocks: int = 0                        # blocks of the prompt the chosen endpoint is believed to hold
    total_blocks: int = 0                         # full blocks in the prompt
    queue_wait_s: float = 0.0                     # time spent in flow control


class RejectedError(Exception):
    """The EPP refuses the request: 429 (EPP queue full, deadline passed, sheddable under saturation)
    or 503 (no healthy endpoint). `body()` is OpenAI's error shape."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    @property
    def type(self) -> str:
        return _ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "internal_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()

    def __repr__(self) -> str:
        return f"RejectedError({self.status}, {self.message!r})"
