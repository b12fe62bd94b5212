"""The engine process's side of engine_proc.py: `python -m tidal.engine.engine_core` runs it.

Owns: `run_engine_core`, the child's loop: it builds the `LLMEngine` and does nothing but
add / abort / step, answering the parent over ZeroMQ with one msgpack message per step (all its
outputs plus a stats snapshot), and the msgpack encoder and decoder both sides use.
Must not: know about HTTP or asyncio; decide anything the engine decides (a rejected request goes
back with the engine's own message).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys

import msgspec
import zmq

from tidal.config import EngineConfig
from tidal.errors import TidalError
from tidal.sampling import SamplingParams

logger = logging.getLogger("tidal.engine")
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def _snapshot(engine) -> dict:
    return {"num_running": engine.num_running, "num_waiting": engine.num_waiting, "kv": engine.kv_stats(),
            "counters": dict(engine.stats), "num_streams": 0, "last_step_seconds": 0.0}


def run_engine_core(config_kwargs: dict, cmd_addr: str, out_addr: str, verbose: bool) -> None:
    """The child process. The parent controls its lifetime (shutdown command), so a Ctrl-C or a
    SIGTERM sent to the whole process group must not kill it in the middle of a drain."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from tidal.engine.llm_engine import LLMEngine
    ctx = zmq.Context()
    cmd, out = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    cmd.connect(cmd_addr)
    out.connect(out_addr)
    parent = os.getppid()
    try:
        engine = LLMEngine(EngineConfig(**config_kwargs), verbose=verbose)
    except Exception as e:   # noqa: BLE001 - reported to the parent, which raises it
        out.send(_enc.encode(["fatal", getattr(e, "message", str(e)), getattr(e, "param", None),
                              isinstance(e, TidalError)]))
        return
    bm = engine.block_manager
    out.send(_enc.encode(["ready", engine.max_model_len, bm.num_blocks * bm.block_size, engine.runner.vocab_size,
                          _snapshot(engine)]))
    stop = drain = False
    live: set[str] = set()   # requests added and not yet finished
    while True:
        busy = engine.has_unfinished_requests()
        if not cmd.poll(0 if busy else 1000):
            if not busy and os.getppid() != parent:   # the parent died without telling us
                break
        messages = []
        while True:
            try:
                messages.append(_dec.decode(cmd.recv(zmq.NOBLOCK)))
            except zmq.Again:
                break
        reply = []
        for m in messages:
            if m[0] == "add":
                _, rid, ids, params, priority = m
                try:
                    engine.add_request(rid, None, SamplingParams(**params), prompt_token_ids=ids, priority=priority)
                    live.add(rid)
                    reply.append(["added", rid])
                except Exception as e:   # noqa: BLE001 - the request's error, sent to its caller
                    reply.append(["rejected", rid, getattr(e, "message", str(e)), getattr(e, "param", None),
                                  isinstance(e, TidalError)])
            elif m[0] == "shutdown":
                stop, drain = True, m[1]
            for rid in ([m[1]] if m[0] == "abort" else list(live) if m[0] == "shutdown" and not drain else []):
                o = engine.abort_request(rid)
                live.discard(rid)
                if o is not None:
                    reply.append(["output", msgspec.to_builtins(o)])
        if engine.has_unfinished_requests():
            try:
                outputs = engine.step()
            except Exception as e:   # noqa: BLE001 - an engine bug: fail what is in flight, keep serving
                logger.exception("engine step failed")
                outputs = []
                for rid in list(live):
                    engine.abort_request(rid)
                    reply.append(["failed", rid, f"engine step failed: {type(e).__name__}: {e}"])
                live.clear()
            for o in outputs:
                if o.finished:
                    live.discard(o.request_id)
                reply.append(["output", msgspec.to_builtins(o)])
        if reply or messages:
            out.send(_enc.encode(["batch", reply, _snapshot(engine)]))
        if stop and not engine.has_unfinished_requests():
            break
    out.send(_enc.encode(["stopped"]))
    out.close(linger=2000)
    cmd.close(linger=0)
    ctx.term()


if __name__ == "__main__":
    run_engine_core(json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1")
