"""The endpoint picker (EPP) of issue #13: llm-d's inference scheduler as a Python library.

Owns: the package's public names. `EndpointPicker(config).pick(RoutingRequest) -> Decision`
(docs/fleet.md seam 3) runs flow control -> filters -> scorers -> picker over an endpoint pool
that polls the replicas' /metrics, with a prefix index fed by their KV events (or, without events,
by routing history). See each module's docstring; the config keys are in config.py.
Must not: import the ext_proc server, the gateway or Kubernetes anything; the EPP runs on a laptop.
"""
from tidal.fleet.epp.config import ConfigError, EndpointSpec, EPPConfig, load_config
from tidal.fleet.epp.picker import EndpointPicker
from tidal.fleet.epp.request import Decision, RejectedError, RoutingRequest

__all__ = ["ConfigError", "Decision", "EPPConfig", "EndpointPicker", "EndpointSpec", "RejectedError",
           "RoutingRequest", "load_config"]
