"""The messages between the engine frontend and the engine core (vLLM v1's EngineCoreRequest / Outputs).

Owns: `EngineCoreRequest` (one sequence to generate: token ids, params, seed; n > 1 is already fanned out
by the frontend), the commands the core loop takes (`AddRequests`, `AbortRequests`, `Shutdown`), what it
sends back after each step (`EngineCoreOutputs`: one `EngineCoreOutput` per sequence that advanced,
carrying only the *new* token ids and their logprobs, plus a stats snapshot), `CoreInfo` (the static
facts the frontend needs: context length, vocabulary, KV capacity, sampling defaults), and the msgpack
encoder / decoders both sides of a process boundary use.
The same Structs travel by reference between threads and as msgpack between processes, so the thread
and process engines share one loop (core_loop.py) and one frontend (frontend.py).
Must not: hold engine objects or text: detokenization and stop strings are the frontend's.
"""
from __future__ import annotations

import msgspec

from tidal.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct):
    request_id: str                  # one sequence: the user's id, or "<id>#<i>" for sample i of n
    prompt_token_ids: list[int]
    params: SamplingParams           # params.n is ignored here: the frontend fanned the request out
    seed: int                        # the sequence's sampling seed (params.seed + i, or drawn)
    priority: int = 0
    arrival_time: float = 0.0        # time.monotonic() at the frontend


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    # one {token id: logprob} per new token (the chosen one and the top-k) when the request asked for them
    new_logprobs: list[dict[int, float]] | None = None
    new_prompt_logprobs: list[dict[int, float] | None] | None = None   # this chunk's, when asked for
    finish_reason: str | None = None    # "stop", "length", "abort"; None while it runs
    stop_reason: int | None = None      # the stop token id that ended it (stop strings: the frontend's)
    num_cached_tokens: int = 0          # prompt tokens the prefix cache served at admission


class CoreStats(msgspec.Struct):
    num_running: int = 0
    num_waiting: int = 0
    kv: dict = msgspec.field(default_factory=dict)         # BlockManager.stats()
    counters: dict = msgspec.field(default_factory=dict)   # EngineCore.stats
    last_step_seconds: float = 0.0


class EngineCoreOutputs(msgspec.Struct, tag="outputs"):
    outputs: list[EngineCoreOutput]
    stats: CoreStats
    # sequences the core could not serve (an engine bug in a step): id -> message; the frontend fails them
    failed: dict[str, str] = msgspec.field(default_factory=dict)


class CoreInfo(msgspec.Struct):
    max_model_len: int
    vocab_size: int
    kv_capacity_tokens: int
    default_sampling: dict
    eos_token_ids: list[int]
    stats: CoreStats


# ---- commands into the core loop -------------------------------------------------------------------
class AddRequests(msgspec.Struct, tag="add"):
    requests: list[EngineCoreRequest]


class AbortRequests(msgspec.Struct, tag="abort"):
    request_ids: list[str]
    # "abort": the client went away (counted as aborted); "stop": the frontend found a stop string, so the
    # sequence already finished and the core only drops it
    reason: str = "abort"


class Shutdown(msgspec.Struct, tag="shutdown"):
    drain: bool = True   # let what is in flight finish first; False: abort it


Command = AddRequests | AbortRequests | Shutdown


# ---- the process boundary (engine_proc.py <-> engine_core.py) ---------------------------------------
class Ready(msgspec.Struct, tag="ready"):
    info: CoreInfo


class Fatal(msgspec.Struct, tag="fatal"):
    message: str
    param: str | None = None
    user_error: bool = False   # a TidalError (bad flags, missing model): raised as one in the parent


class Stopped(msgspec.Struct, tag="stopped"):
    pass


encoder = msgspec.msgpack.Encoder()
command_decoder = msgspec.msgpack.Decoder(Command)
reply_decoder = msgspec.msgpack.Decoder(EngineCoreOutputs | Ready | Fatal | Stopped)
