"""`tidal batch IN.jsonl OUT.jsonl`: an OpenAI-format batch file streamed through the engine.

Owns: reading the input lazily with a bounded number of requests in flight (continuous batching
without holding a 1M-line file in memory), one output record per input line appended the moment
it finishes (so OUT is in completion order, not input order, as with OpenAI's batch API), resume
(a rerun skips what OUT already holds and cuts a torn last line, so each line is answered exactly
once even after `kill -9`), the progress bar and the summary.
Must not: define request shapes or sampling rules: bodies are validated by the server's protocol
models and mapped by its `sampling_params`, so a body means the same here as over HTTP.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time
import uuid
from collections import Counter

from tidal.errors import TidalError

# The server modules (request models, sampling mapping, logprob shapes) are imported inside the
# functions that use them: they pull in torch and fastapi (~2 s), which `tidal --help` must not pay.
_URLS = ("/v1/chat/completions", "/v1/completions")
_DUPLICATE = "duplicate_custom_id"
_FSYNC_EVERY_S = 2.0   # a crash loses at most this much finished work to the page cache


def add_batch_parser(subparsers, add_engine_flags):
    p = subparsers.add_parser("batch", help="run an OpenAI-format batch file (JSONL) through the engine; resumable",
                              description="Results are appended to OUT in completion order, not input order; match "
                                          "them by custom_id. Rerun the same command to resume after a crash.")
    p.add_argument("input", help="input JSONL: {custom_id, method, url, body} per line")
    p.add_argument("output", help="output JSONL; lines already there are kept and their custom_ids skipped")
    p.add_argument("--max-in-flight", type=int, default=None, help="requests in the engine at once "
                   "(default: 4 x --max-num-seqs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_flags(p)
    return p


def run_batch(args, engine_kwargs: dict) -> int:
    from tidal.config import EngineConfig
    from tidal.engine.llm_engine import LLMEngine
    if not os.path.isfile(args.input):
        raise TidalError(f"the input file {args.input} does not exist")
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        raise TidalError("the output file must not be the input file")
    if args.max_in_flight is not None and args.max_in_flight < 1:
        raise TidalError("--max-in-flight must be at least 1", param="max_in_flight")
    out = _Writer(args.output)   # lock, then read: a busy or damaged OUT fails before the model loads
    try:
        done = scan_output(args.output)
        engine = LLMEngine(EngineConfig.from_kwargs(**engine_kwargs), verbose=True)
    except BaseException:
        out.close()
        raise
    stats = process(engine, args.input, args.output, done=done, max_in_flight=args.max_in_flight,
                    progress=not args.no_progress, out=out)
    print(summary(stats), file=sys.stderr)
    return 130 if stats["interrupted"] else 0


def main(argv: list[str] | None = None) -> int:
    """`python -c "from tidal.batch import main; main()"`: the same command without tidal.cli."""
    import argparse
    from tidal.cli import _add_engine_flags, engine_kwargs
    args = add_batch_parser(argparse.ArgumentParser(prog="tidal").add_subparsers(), _add_engine_flags) \
        .parse_args(argv)
    try:
        return run_batch(args, engine_kwargs(args))
    except TidalError as e:
        print(f"tidal: error: {e.message}", file=sys.stderr)
        return 2


class Done:
    """What OUT already answers: custom_ids, duplicate-error counts, and input lines without an id."""

    def __init__(self):
        self.ids: set[str] = set()
        self.duplicates: Counter = Counter()
        self.lines: set[int] = set()
        self.records = 0


def scan_output(path: str) -> Done:
    """Read OUT, cutting a torn last line (a crash mid-write) so the next record starts on a line of its own."""
    done = Done()
    if not os.path.exists(path):
        return done
    good_end = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                rec = json.loads(raw) if raw.endswith(b"\n") else None
            except ValueError:
                rec = None
            if rec is None and f.read(1):   # only the last line can be torn; anything else is damage
                raise TidalError(f"{path} line {lineno} is not a complete JSON record, so it is not a tidal batch "
                                 "output (or it was damaged); move it away or repair that line")
            if rec is None:
                break
            if not isinstance(rec, dict) or "custom_id" not in rec:
                raise TidalError(f"{path} line {lineno} has no custom_id; it is not a batch output file")
            good_end += len(raw)
            done.records += 1
            cid, err = rec["custom_id"], rec.get("error") or {}
            if err.get("code") == _DUPLICATE:
                done.duplicates[cid] += 1
            elif cid is not None:
                done.ids.add(cid)
            elif isinstance(err.get("line"), int):
                done.lines.add(err["line"])
    if good_end < os.path.getsize(path):
        os.truncate(path, good_end)
    return done


class _Writer:
    """Appends whole records with one write each (a kill leaves at most one torn line) and fsyncs
    every few seconds and at close. Holds an exclusive lock on OUT: two runs appending to one file
    would answer lines twice. The kernel drops the lock when the process dies, even by kill -9."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise TidalError(f"another `tidal batch` is writing {path}; wait for it or stop it first")
        self.last_sync = time.monotonic()

    def write(self, record: dict) -> None:
        data = memoryview((json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode())
        while data:
            data = data[os.write(self.fd, data):]
        if time.monotonic() - self.last_sync > _FSYNC_EVERY_S:
            os.fsync(self.fd)
            self.last_sync = time.monotonic()

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


class _Ctx:
    """The slice of the server's context that check_fits and the logprob formatters read."""

    def __init__(self, engine):
        self.tokenizer = engine.tokenizer
        bm = engine.block_manager
        self.engine = type("EngineLimits", (), {"max_model_len": engine.max_model_len,
                                                "kv_capacity_tokens": bm.num_blocks * bm.block_size})

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


class _Job:
    """One input line in the engine: its prompts (a completions line may hold several) and their results."""

    def __init__(self, custom_id, chat, req, prompts):
        self.custom_id, self.chat, self.req, self.prompts = custom_id, chat, req, prompts
        self.finals, self.remaining = [None] * len(prompts), len(prompts)


def _line_error(lineno, custom_id, code, message, status=None, body=None, param=None) -> dict:
    response = None if status is None else {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}",
                                            "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response,
            "error": {"code": code, "message": message, "param": param, "line": lineno}}


def _parse(lineno: int, raw: bytes) -> tuple[str | None, dict | None, dict | None]:
    """-> (custom_id or None, the line, an error record if the line is not a usable batch request)."""
    try:
        line = json.loads(raw)
    except ValueError as e:
        return None, None, _line_error(lineno, None, "invalid_json", f"line {lineno} is not valid JSON ({e})")
    cid = line.get("custom_id") if isinstance(line, dict) else None
    if not isinstance(cid, str) or not cid:
        return None, None, _line_error(lineno, None, "invalid_request",
                                       f"line {lineno} needs to be a JSON object with a non-empty string `custom_id`")
    if line.get("method", "POST") != "POST":
        return cid, line, _line_error(lineno, cid, "invalid_method", f"method must be POST, not {line['method']!r}")
    if line.get("url") not in _URLS:
        return cid, line, _line_error(lineno, cid, "invalid_url",
                                      f"url must be one of {sorted(_URLS)}, not {line.get('url')!r}")
    if not isinstance(line.get("body"), dict):
        return cid, line, _line_error(lineno, cid, "missing_body", "the line needs a `body` object (the request)")
    return cid, line, None


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise TidalError("this model has no chat template; use /v1/completions lines", param="messages")
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    except Exception as e:   # jinja's TemplateError and the tokenizer's ValueError: the messages' fault
        if isinstance(e, (ValueError, TypeError, KeyError)) or type(e).__module__.startswith("jinja2"):
            raise TidalError(f"the chat template rejected these messages: {e}", param="messages")
        raise
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _prepare(ctx: _Ctx, cid: str, line: dict) -> tuple[_Job, object]:
    """Validate the body like the server does -> (job, SamplingParams); raises on a bad body."""
    from tidal.server import serving_chat
    from tidal.server.common import check_fits, sampling_params
    from tidal.server.errors import APIError
    from tidal.server.protocol import ChatCompletionRequest, CompletionRequest
    chat = line["url"] == "/v1/chat/completions"
    req = (ChatCompletionRequest if chat else CompletionRequest).model_validate(line["body"])
    if chat:
        if req.tools or req.tool_choice not in (None, "none", "auto"):
            raise APIError("tools / function calling is not supported yet; drop `tools`", param="tools")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
        prompts = [_chat_ids(ctx.tokenizer, serving_chat._messages(req), req.add_generation_prompt)]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, req.n)
    else:
        if req.suffix or (req.best_of is not None and req.best_of != req.n):
            raise APIError("suffix and best_of (other than n) are not supported; drop them", param="suffix")
        if req.echo and req.logprobs is not None:
            raise APIError("echo together with logprobs is not supported yet", param="echo")
        items = [req.prompt] if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)) \
            else list(req.prompt)
        prompts = [ctx.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in items]
        if not prompts or not all(prompts):
            raise APIError("`prompt` is empty; give at least one token", param="prompt")
        params = sampling_params(req, req.max_tokens, req.logprobs, req.n)
    for ids in prompts:
        check_fits(ctx, len(ids), params)
    return _Job(cid, chat, req, prompts), params


def _success(ctx: _Ctx, job: _Job, model: str) -> tuple[dict, int]:
    from tidal.server import serving_chat, serving_completions
    req, choices, completion_tokens = job.req, [], 0
    for i, final in enumerate(job.finals):
        for c in final.outputs:
            completion_tokens += len(c.token_ids)
            choice = {"index": i * req.n + c.index, "logprobs": None, "finish_reason": c.finish_reason,
                      "stop_reason": c.stop_reason}
            if job.chat:
                choice["message"] = {"role": "assistant", "content": c.text}
                if req.logprobs:
                    choice["logprobs"] = serving_chat._logprobs(ctx, c.token_ids, c.logprobs, req.top_logprobs or 0)
            else:
                choice["text"] = (ctx.tokenizer.decode(job.prompts[i]) if req.echo else "") + c.text
                if c.logprobs is not None:
                    choice["logprobs"] = serving_completions._logprobs(ctx, c.token_ids, c.logprobs, 0)
            choices.append(choice)
    prompt_tokens = sum(len(p) for p in job.prompts)
    body = {"id": f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if job.chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
    record = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": job.custom_id,
              "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": body}, "error": None}
    return record, completion_tokens


def process(engine, in_path: str, out_path: str, done: Done | None = None, max_in_flight: int | None = None,
            progress: bool = True, out: _Writer | None = None) -> dict:
    """Answer every line of IN not already in OUT; returns the counts the summary prints. Closes `out`."""
    from tqdm import tqdm
    out = out or _Writer(out_path)
    try:
        done = done if done is not None else scan_output(out_path)
        with open(in_path, "rb") as f:   # a cheap first pass, so the bar has a total and an ETA
            total = sum(1 for raw in f if raw.strip())
        with tqdm(total=total, initial=min(done.records, total), desc="batch", unit=" req", disable=not progress,
                  dynamic_ncols=True) as bar:
            return _Run(engine, done, out, bar).run(in_path, max_in_flight or 4 * engine.config.max_num_seqs)
    finally:
        out.close()


class _Run:
    def __init__(self, engine, done: Done, out: _Writer, bar):
        self.engine, self.done, self.out, self.bar = engine, done, out, bar
        self.ctx, self.model = _Ctx(engine), engine.config.model
        self.stats = {"completed": 0, "failed": 0, "skipped": 0, "prompt_tokens": 0, "completion_tokens": 0,
                      "interrupted": False}
        self.seen: Counter = Counter()   # custom_id -> occurrences so far in IN
        self.jobs: dict[str, tuple[_Job, int]] = {}   # engine request id -> (job, prompt index)
        self.t0 = time.perf_counter()

    def run(self, in_path: str, limit: int) -> dict:
        try:
            with open(in_path, "rb") as f:
                lines = ((n, raw) for n, raw in enumerate(f, 1) if raw.strip())
                eof = False
                while not eof or self.engine.has_unfinished_requests():
                    while not eof and len(self.jobs) < limit:   # top up as requests finish: continuous batching
                        nxt = next(lines, None)
                        eof = nxt is None
                        if not eof:
                            self.admit(*nxt)
                    for o in self.engine.step():
                        if o.finished and o.request_id in self.jobs:
                            self.finish(o)
        except KeyboardInterrupt:
            self.stats["interrupted"] = True
            for rid in list(self.jobs):
                self.engine.abort_request(rid)
        self.stats["elapsed_s"] = time.perf_counter() - self.t0
        return self.stats

    def emit(self, record: dict, ok: bool = False, completion_tokens: int = 0) -> None:
        self.out.write(record)
        self.stats["completed" if ok else "failed"] += 1
        self.stats["completion_tokens"] += completion_tokens
        self.bar.update(1)
        rate = self.stats["completion_tokens"] / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate:.1f} out tok/s")

    def skip(self) -> None:
        self.stats["skipped"] += 1

    def admit(self, lineno: int, raw: bytes) -> None:
        cid, line, bad = _parse(lineno, raw)
        if cid is None:   # OUT knows a line without a custom_id by its line number
            return self.skip() if lineno in self.done.lines else self.emit(bad)
        self.seen[cid] += 1
        if self.seen[cid] > 1:   # the first occurrence is answered; each later one gets an error record
            if self.done.duplicates[cid] >= self.seen[cid] - 1:
                return self.skip()
            return self.emit(_line_error(lineno, cid, _DUPLICATE,
                                         f"custom_id {cid!r} appears earlier in the input; make custom_ids unique"))
        if cid in self.done.ids:
            return self.skip()
        if bad is not None:
            return self.emit(bad)
        from pydantic import ValidationError
        from tidal.server.errors import APIError, _validation_message, from_exception
        added = []
        try:
            job, params = _prepare(self.ctx, cid, line)
            for i, ids in enumerate(job.prompts):
                added.append(self.engine.add_request(f"batch-{lineno}-{i}", None, params, prompt_token_ids=ids,
                                                     priority=job.req.priority))
                self.jobs[added[-1]] = (job, i)
        except (ValidationError, APIError, TidalError) as e:
            for rid in added:   # all of a line's prompts run, or none
                self.engine.abort_request(rid)
                self.jobs.pop(rid)
            if isinstance(e, ValidationError):
                message, param = _validation_message(e)
                status, body = 400, {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                               "code": None}}
            else:
                status, body = from_exception(e)
            err = body["error"]
            self.emit(_line_error(lineno, cid, err["code"] or err["type"], err["message"], status, body, err["param"]))

    def finish(self, output) -> None:
        job, i = self.jobs.pop(output.request_id)
        job.finals[i] = output
        job.remaining -= 1
        if job.remaining == 0:
            record, completion_tokens = _success(self.ctx, job, self.model)
            self.stats["prompt_tokens"] += sum(len(p) for p in job.prompts)
            self.emit(record, True, completion_tokens)


def summary(s: dict) -> str:
    rate = s["completion_tokens"] / max(s["elapsed_s"], 1e-9)
    head = "tidal batch: interrupted; rerun the same command to resume. " if s["interrupted"] else "tidal batch: "
    return (f"{head}{s['completed']} completed, {s['failed']} failed, {s['skipped']} skipped (already in the "
            f"output); {s['prompt_tokens']} prompt + {s['completion_tokens']} completion tokens in "
            f"{s['elapsed_s']:.1f} s ({rate:.1f} out tok/s). Results are in completion order; match them by custom_id.")


if __name__ == "__main__":
    sys.exit(main())
