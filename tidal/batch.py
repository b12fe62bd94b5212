"""`tidal batch IN.jsonl OUT.jsonl`: an OpenAI-format batch file streamed through the engine.

Owns: the command (its flags, `run_batch`, `main`), reading the input lazily with a bounded number
of requests in flight (continuous batching without holding a 1M-line file in memory), one output
record per input line appended the moment it finishes (so OUT is in completion order, not input
order, as with OpenAI's batch API), resume (a rerun skips what OUT already holds, so each line is
answered exactly once even after `kill -9`), the progress bar and the summary.
Reading and appending OUT (the lock, torn last lines, fsync) live in batch_output.py; turning one
line into engine requests and a finished line into its record live in batch_requests.py.
Must not: define request shapes, checks, sampling rules or response shapes: a line's body goes
through the server's own request handling (batch_requests.LineRequests: a real ServerContext and
serving_*.prepare_*), so a body means the same here as over HTTP.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter

from tidal.batch_output import _DUPLICATE, Done, _Writer, scan_output
from tidal.batch_requests import LineRequests, _Job, _line_error, _parse
from tidal.errors import TidalError

# The engine, the server's error mapping and tqdm are imported inside the functions that use them:
# they pull in torch and fastapi (~2 s), which `tidal --help` must not pay.


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
        if engine_kwargs.get("host_mem") or engine_kwargs.get("device_mem"):  # --policy auto plans for this file
            engine_kwargs = {**planning_hint(args.input), **engine_kwargs}
        engine = LLMEngine(EngineConfig.from_kwargs(**engine_kwargs), verbose=True)
    except BaseException:
        out.close()
        raise
    stats = process(engine, args.input, args.output, done=done, max_in_flight=args.max_in_flight,
                    progress=not args.no_progress, out=out)
    print(summary(stats), file=sys.stderr)
    return 130 if stats["interrupted"] else 0


def planning_hint(path: str, sample: int = 1000) -> dict:
    """{"prompt_len", "gen_len"} for the offloading planner from the first `sample` lines of a batch
    file: mean prompt characters / 4 (about a token each) and mean max_tokens; {} when unreadable."""
    import json
    chars, gens = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if i >= sample:
                break
            try:
                body = json.loads(line).get("body") or {}
            except (ValueError, AttributeError):
                continue
            text = body.get("prompt") if "prompt" in body else \
                " ".join(str(m.get("content", "")) for m in body.get("messages") or [] if isinstance(m, dict))
            chars.append(len(text) if isinstance(text, str) else len(json.dumps(text)))
            n = body.get("max_completion_tokens") or body.get("max_tokens")
            if isinstance(n, int) and n > 0:
                gens.append(n)
    hint = {}
    if chars:
        hint["prompt_len"] = max(1, round(sum(chars) / len(chars) / 4))
    if gens:
        hint["gen_len"] = max(1, round(sum(gens) / len(gens)))
    return hint


def main(argv: list[str] | None = None) -> int:
    """`python -c "from tidal.batch import main; main()"`: the same command without tidal.cli."""
    import argparse
    from tidal.config import add_engine_flags as _add_engine_flags
    from tidal.config import engine_kwargs
    args = add_batch_parser(argparse.ArgumentParser(prog="tidal").add_subparsers(), _add_engine_flags) \
        .parse_args(argv)
    try:
        return run_batch(args, engine_kwargs(args))
    except TidalError as e:
        print(f"tidal: error: {e.message}", file=sys.stderr)
        return 2


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
        self.requests = LineRequests(engine)
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
        finally:
            self.requests.close()
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
        added = []
        try:
            job = self.requests.prepare(cid, line)
            for i, ids in enumerate(job.prep.prompts):
                added.append(self.engine.add_request(f"batch-{lineno}-{i}", None, job.prep.params,
                                                     prompt_token_ids=ids, priority=job.req.priority))
                self.jobs[added[-1]] = (job, i)
        except self.requests.errors as e:
            for rid in added:   # all of a line's prompts run, or none
                self.engine.abort_request(rid)
                self.jobs.pop(rid)
            self.emit(self.requests.error_record(lineno, cid, e))

    def finish(self, output) -> None:
        job, i = self.jobs.pop(output.request_id)
        job.finals[i] = output
        job.remaining -= 1
        if job.remaining == 0:
            record, completion_tokens = self.requests.success(job)
            self.stats["prompt_tokens"] += job.prep.prompt_tokens
            self.emit(record, True, completion_tokens)


def summary(s: dict) -> str:
    rate = s["completion_tokens"] / max(s["elapsed_s"], 1e-9)
    head = "tidal batch: interrupted; rerun the same command to resume. " if s["interrupted"] else "tidal batch: "
    return (f"{head}{s['completed']} completed, {s['failed']} failed, {s['skipped']} skipped (already in the "
            f"output); {s['prompt_tokens']} prompt + {s['completion_tokens']} completion tokens in "
            f"{s['elapsed_s']:.1f} s ({rate:.1f} out tok/s). Results are in completion order; match them by custom_id.")


if __name__ == "__main__":
    sys.exit(main())
