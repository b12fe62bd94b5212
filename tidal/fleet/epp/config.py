"""The EPP's configuration: endpoints, scorer weights, thresholds, intervals, TTLs, flow-control bands.

Owns: `EPPConfig` (and its parts), its defaults, and reading it from a YAML or JSON file or a dict,
with every unknown key and bad value refused by name, so a typo is an error rather than a silently
ignored setting. No file is needed: `EPPConfig()` is a working configuration once it has endpoints.
Must not: start anything, poll, or import the rest of the EPP (everything else reads this).

File shape (YAML or JSON; every key optional)::

    endpoints:                      # "host:port", or a mapping
      - 10.0.0.1:8000
      - {address: 10.0.0.2:8000, role: decode, kv_events: "tcp://10.0.0.2:5557", model: smollm2}
    poll_interval_s: 0.05           # GET /metrics period
    health_interval_s: 0.5          # GET /health period
    request_timeout_s: 1.0
    failure_threshold: 3            # consecutive failed polls before an endpoint leaves rotation
    tokenizer: smollm2              # model to tokenize with (default: the name /v1/models reports)
    role: null                      # only endpoints with this role (or "both"); null: any
    prefix:   {block_size: 16, speculative_ttl_s: 30.0, lru_capacity_blocks: 65536}
    scorers:  {prefix: 3, queue: 2, kv_cache: 1, running: 1, spread: 2, session: 2}   # weight 0: off
                                    # (spread: a prefix no replica holds goes where the fewest blocks are)
    picker:   {type: max_score, tie_break: least_loaded}   # tie_break: or random; type: or round_robin
                                    # (round_robin: scores ignored, the next address in turn; a baseline)
    saturation: {queue_depth: 5, kv_cache: 0.8,          # a replica cold for the request is full here
                 warm_queue_depth: 12, warm_kv_cache: 0.95, warm_fraction: 0.5}
                                    # ... one holding >= warm_fraction of the prompt's blocks only here
    flow_control: {enabled: true, max_queue: 1024, max_queue_per_band: 512, default_priority: 0,
                   queue_timeout_s: 30, bands: {critical: 10, standard: 0, sheddable: -10}}
    headers: {session: x-session-id, priority: x-gateway-priority, tenant: x-gateway-tenant,
              deadline: x-gateway-deadline-ms}
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

ROLES = ("prefill", "decode", "both")
SCORERS = ("prefix", "queue", "kv_cache", "running", "spread", "session")


class ConfigError(ValueError):
    """A bad EPP configuration (unknown key, wrong type or value); the message names the key."""


@dataclass
class EndpointSpec:
    address: str                    # "host:port"
    role: str = "both"              # prefill | decode | both
    kv_events: str | None = None    # ZeroMQ endpoint of its KV events (tcp://host:port); None: approximate prefix
    model: str | None = None        # expected model name; None: what /v1/models says

    def __post_init__(self):
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"endpoint address {self.address!r} is not host:port")
        if self.role not in ROLES:
            raise ConfigError(f"endpoint {self.address}: role {self.role!r} is not one of {', '.join(ROLES)}")


@dataclass
class PrefixConfig:
    block_size: int = 16              # the replicas' --block-size
    speculative_ttl_s: float = 30.0   # a routed request's blocks count as held this long (refreshed by each
    #                                   routing) until the replica's BlockStored confirms or BlockRemoved drops
    #                                   them; longer than a cold prefill behind a queue, or a group spreads
    lru_capacity_blocks: int = 65536  # approximate mode: blocks remembered per replica


@dataclass
class PickerConfig:
    type: str = "max_score"           # max_score | round_robin (ignores the scores: a baseline)
    tie_break: str = "least_loaded"   # least_loaded | random


@dataclass
class SaturationConfig:
    queue_depth: int = 5       # an endpoint with this many waiting (+ dispatched since its last poll) is saturated
    kv_cache: float = 0.8      # ... or with this KV-cache usage (0-1)
    # A replica holding at least `warm_fraction` of the prompt's full blocks needs only a short prefill and
    # few new blocks there, while a cold replica needs the whole prefill (2,048 tokens: seconds, stalling its
    # batch) and evicts another prefix: for that request it is saturated only at these higher limits
    # (never lower than the cold ones: a warm limit below its cold one counts as equal to it).
    warm_queue_depth: int = 12
    warm_kv_cache: float = 0.95
    warm_fraction: float = 0.5


@dataclass
class FlowControlConfig:
    enabled: bool = True
    max_queue: int = 1024            # requests held in the EPP, all bands together
    max_queue_per_band: int = 512
    default_priority: int = 0
    queue_timeout_s: float = 30.0    # default deadline for waiting in the EPP
    bands: dict[str, int] = field(default_factory=lambda: {"critical": 10, "standard": 0, "sheddable": -10})


@dataclass
class HeaderNames:
    session: str = "x-session-id"
    priority: str = "x-gateway-priority"
    tenant: str = "x-gateway-tenant"
    deadline: str = "x-gateway-deadline-ms"   # how long the request may wait in the EPP, in ms


@dataclass
class EPPConfig:
    endpoints: list[EndpointSpec] = field(default_factory=list)
    poll_interval_s: float = 0.05
    health_interval_s: float = 0.5
    request_timeout_s: float = 1.0
    failure_threshold: int = 3
    tokenizer: str | None = None
    role: str | None = None
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    scorers: dict[str, float] = field(default_factory=lambda: {"prefix": 3.0, "queue": 2.0, "kv_cache": 1.0,
                                                                "running": 1.0, "spread": 2.0, "session": 2.0})
    picker: PickerConfig = field(default_factory=PickerConfig)
    saturation: SaturationConfig = field(default_factory=SaturationConfig)
    flow_control: FlowControlConfig = field(default_factory=FlowControlConfig)
    headers: HeaderNames = field(default_factory=HeaderNames)

    def __post_init__(self):
        self.endpoints = [e if isinstance(e, EndpointSpec) else _endpoint(e) for e in self.endpoints]
        addresses = [e.address for e in self.endpoints]
        if len(set(addresses)) != len(addresses):
            raise ConfigError(f"endpoints: an address is listed twice ({addresses})")
        for name in ("poll_interval_s", "health_interval_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        if self.failure_threshold < 1:
            raise ConfigError("failure_threshold must be >= 1")
        if self.role is not None and self.role not in ROLES:
            raise ConfigError(f"role {self.role!r} is not one of {', '.join(ROLES)}")
        unknown = set(self.scorers) - set(SCORERS)
        if unknown:
            raise ConfigError(f"scorers: unknown scorer(s) {sorted(unknown)}; known: {', '.join(SCORERS)}")
        if any(w < 0 for w in self.scorers.values()):
            raise ConfigError("scorers: weights must be >= 0")
        if self.picker.tie_break not in ("least_loaded", "random"):
            raise ConfigError("picker.tie_break must be least_loaded or random")
        if self.picker.type not in ("max_score", "round_robin"):
            raise ConfigError("picker.type must be max_score or round_robin")
        if self.prefix.block_size < 1 or self.prefix.speculative_ttl_s < 0 or self.prefix.lru_capacity_blocks < 1:
            raise ConfigError("prefix: block_size and lru_capacity_blocks must be >= 1, speculative_ttl_s >= 0")
        sat = self.saturation
        if not 0 < sat.warm_fraction <= 1:
            raise ConfigError("saturation.warm_fraction must be in (0, 1]")
        fc = self.flow_control
        if fc.max_queue < 0 or fc.max_queue_per_band < 0 or fc.queue_timeout_s <= 0:
            raise ConfigError("flow_control: max_queue(_per_band) must be >= 0 and queue_timeout_s > 0")

    @classmethod
    def from_dict(cls, data: dict) -> "EPPConfig":
        if not isinstance(data, dict):
            raise ConfigError("the EPP config must be a mapping")
        parts = {"prefix": PrefixConfig, "picker": PickerConfig, "saturation": SaturationConfig,
                 "flow_control": FlowControlConfig, "headers": HeaderNames}
        kwargs = _checked(cls, data, "")
        for key, part in parts.items():
            if key in kwargs:
                kwargs[key] = part(**_checked(part, kwargs[key], key + "."))
        if "scorers" in kwargs:   # weights given replace only the scorers named
            kwargs["scorers"] = {**cls().scorers, **{k: float(v) for k, v in (kwargs["scorers"] or {}).items()}}
        if isinstance(kwargs.get("headers"), HeaderNames):
            h = kwargs["headers"]
            for f in fields(h):
                setattr(h, f.name, getattr(h, f.name).lower())
        return cls(**kwargs)


def load_config(path: str | Path | None = None, **overrides) -> EPPConfig:
    """Read a YAML (.yaml/.yml) or JSON file; `overrides` replace top-level keys (e.g. endpoints)."""
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return EPPConfig.from_dict(data)


def _endpoint(item) -> EndpointSpec:
    if isinstance(item, str):
        return EndpointSpec(item)
    if isinstance(item, dict):
        return EndpointSpec(**_checked(EndpointSpec, item, "endpoints[]."))
    raise ConfigError(f"endpoints: {item!r} is neither host:port nor a mapping")


def _checked(cls, data, prefix: str) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in sorted(unknown))}; "
                          f"known: {', '.join(prefix + k for k in sorted(known))}")
    return dict(data)
