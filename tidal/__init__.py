"""tidal: an LLM inference engine and serving system.

`from tidal import LLM, SamplingParams` is the offline API; `tidal` is the command line.
Imports are lazy so `tidal --help` and error paths stay fast.
"""
from tidal.errors import TidalError

__all__ = ["LLM", "SamplingParams", "TidalError", "EngineConfig", "LLMEngine", "RequestOutput"]


def __getattr__(name):
    if name == "LLM":
        from tidal.llm import LLM
        return LLM
    if name == "SamplingParams":
        from tidal.sampling import SamplingParams
        return SamplingParams
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
