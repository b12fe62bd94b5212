"""tidal: an LLM inference engine and serving system.

`from tidal import LLM, SamplingParams` is the offline API; `tidal` is the command line.
Imports are lazy so `tidal --help` and error paths stay fast.
"""
import os

# OpenMP threads that spin long while waiting for work stall badly whenever another process (a
# server beside its client, a test runner, a noisy neighbour) shares the cores: measured here,
# a small matmul went from 0.2 ms to 40 ms. Never spinning (OMP_WAIT_POLICY=PASSIVE) costs 15%
# on a quiet machine; a short spin (libgomp's GOMP_SPINCOUNT) keeps the quiet-machine speed and
# avoids the stalls. Set before torch starts its thread pool; the user's own settings win.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"

from tidal.errors import TidalError  # noqa: E402

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "TidalError", "EngineConfig", "LLMEngine",
           "RequestOutput"]


def __getattr__(name):
    if name == "LLM":
        from tidal.llm import LLM
        return LLM
    if name == "SamplingParams":
        from tidal.sampling import SamplingParams
        return SamplingParams
    if name == "StructuredOutputsParams":
        from tidal.structured import StructuredOutputsParams
        return StructuredOutputsParams
    if name == "EngineConfig":
        from tidal.config import EngineConfig
        return EngineConfig
    if name == "LLMEngine":
        from tidal.engine.llm_engine import LLMEngine
        return LLMEngine
    if name == "RequestOutput":
        from tidal.outputs import RequestOutput
        return RequestOutput
    raise AttributeError(name)
