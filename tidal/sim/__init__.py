"""The simulated replica (`tidal serve --simulate`): an engine core with a latency model instead of a model.

Owns: `SimulatedCore` (core.py) and `SimConfig` (latency.py). A package of its own, not under tidal/fleet:
the server starts it, and tidal/fleet imports tidal/server (the EPP tokenizes as the server does), so
the server must not import tidal/fleet (docs/fleet.md).
Must not: load weights, run torch, or import tidal.fleet or tidal.server.
"""
from tidal.sim.core import SimulatedCore
from tidal.sim.latency import SimConfig

__all__ = ["SimulatedCore", "SimConfig"]
