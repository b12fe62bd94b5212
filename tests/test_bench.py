"""tidal.bench: workload determinism, the JSON record, the subcommand hook, and a tiny end-to-end run."""
import argparse
import json

import pytest

from tidal import bench
from tidal.bench import MIN_TOKEN_ID, format_table, make_record, make_results, make_workload, parse_range
from tidal.errors import TidalError


def test_workload_is_deterministic_and_in_range():
    a = make_workload(16, (10, 40), (3, 9), seed=7, vocab_size=1000)
    b = make_workload(16, (10, 40), (3, 9), seed=7, vocab_size=1000)
    c = make_workload(16, (10, 40), (3, 9), seed=8, vocab_size=1000)
    assert a.prompts == b.prompts and a.output_lens == b.output_lens
    assert a.summary()["fingerprint"] == b.summary()["fingerprint"] != c.summary()["fingerprint"]
    assert a.prompts != c.prompts
    assert len(a.prompts) == len(a.output_lens) == 16
    assert all(10 <= len(p) <= 40 for p in a.prompts) and all(3 <= n <= 9 for n in a.output_lens)
    ids = [t for p in a.prompts for t in p]
    assert min(ids) >= MIN_TOKEN_ID and max(ids) < 1000
    assert len({len(p) for p in a.prompts}) > 1  # lengths are drawn, not constant


def test_workload_pinned_values():
    # peers on other machines must regenerate the same ids; a change here breaks comparability of old records
    w = make_workload(2, (3, 5), (1, 4), seed=0, vocab_size=49152)
    assert w.output_lens == [4, 4]
    assert w.prompts == [[33606, 31945, 26637], [19977, 31334, 23565, 38332]]


def test_dataset_workload(tmp_path):
    class Tok:
        def encode(self, text):
            return [100 + len(w) for w in text.split()]
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a bb ccc"}\n\n{"prompt": "dddd"}\n{"other": 1}\n')
    w = make_workload(2, output_len=(5, 6), seed=1, dataset=str(path), tokenizer=Tok())
    assert w.prompts == [[101, 102, 103], [104]]
    assert w.input_len == (1, 3) and all(5 <= n <= 6 for n in w.output_lens)
    with pytest.raises(TidalError, match="lower --num-prompts to 2"):
        make_workload(3, dataset=str(path), tokenizer=Tok())
    with pytest.raises(TidalError, match="cannot read"):
        make_workload(1, dataset=str(tmp_path / "missing.jsonl"), tokenizer=Tok())


def test_parse_range():
    assert parse_range("100-512") == (100, 512)
    assert parse_range("100:512") == (100, 512)
    assert parse_range("128") == (128, 128)
    for bad in ("512-100", "x", "0-4", "1-2-3", "-5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_range(bad)


def test_record_schema_and_rates():
    w = make_workload(4, (10, 10), (5, 5), seed=0, vocab_size=500)
    rec = make_record(w, {"name": "x", "dtype": "float32"}, make_results(w, 2.0, 1.5))
    assert set(rec) >= {"workload", "engine", "versions", "machine", "results", "date"}
    assert rec["workload"]["total_input_tokens"] == 40 and rec["workload"]["total_output_tokens"] == 20
    r = rec["results"]
    assert r["output_tokens_per_s"] == 10.0 and r["total_tokens_per_s"] == 30.0 and r["requests_per_s"] == 2.0
    assert r["load_s"] == 1.5
    assert {"python", "torch", "transformers", "tidal"} <= set(rec["versions"])
    assert rec["machine"]["cores"] >= 1 and rec["machine"]["torch_threads"] >= 1
    json.dumps(rec)  # serializable
    other = make_record(make_workload(4, (10, 10), (5, 5), seed=1, vocab_size=500), {"name": "y"},
                        make_results(w, 4.0, None))
    table = format_table([rec, other])
    assert "10.00" in table and "5.00" in table and "different workloads" in table


def test_table_labels_name_the_quantization():
    w = make_workload(2, (10, 10), (5, 5), seed=0, vocab_size=500)
    args = {"quant": "w8a8", "quant_head": "w8a8", "kv_quant": "int8"}
    rec = make_record(w, {"name": "tidal", "dtype": "bfloat16", "args": args}, make_results(w, 2.0, 1.0))
    plain = make_record(w, {"name": "tidal", "dtype": "bfloat16", "args": {"quant": "none", "kv_quant": "none"}},
                        make_results(w, 2.0, 1.0))
    header = format_table([rec, plain]).splitlines()[1]
    assert "tidal bfloat16 w8a8 head=w8a8 kv=int8" in header and header.count("kv=") == 1


def test_register_bench_command(monkeypatch):
    monkeypatch.setattr(bench, "_COMMANDS", dict(bench._COMMANDS))
    seen = {}

    def add_args(p, add_engine_flags):
        p.add_argument("--rate", type=float, default=1.0)
        add_engine_flags(p)

    bench.register_bench_command("fake", add_args, lambda args, kw: seen.update(rate=args.rate, kw=kw) or 3)
    from tidal.cli import build_parser, engine_kwargs
    args = build_parser().parse_args(["bench", "fake", "--rate", "2.5", "--dtype", "float32"])
    assert bench.run_bench_cli(args, engine_kwargs(args)) == 3
    assert seen == {"rate": 2.5, "kw": {"dtype": "float32"}}


def test_tidal_bench_throughput_end_to_end(tmp_path, capsys):
    from tidal.cli import main
    out = tmp_path / "r.json"
    rc = main(["bench", "throughput", "--num-prompts", "4", "--input-len", "8-24", "--output-len", "2-5",
               "--seed", "3", "--json", str(out), "--no-tqdm", "--dtype", "float32", "--device", "cpu",
               "--num-kv-blocks", "64", "--warmup", "0", "--load-format", "dummy"])
    assert rc == 0
    rec = json.loads(out.read_text())
    w = make_workload(4, (8, 24), (2, 5), seed=3, vocab_size=49152)
    assert rec["workload"]["fingerprint"] == w.summary()["fingerprint"]
    assert rec["results"]["output_tokens"] == sum(w.output_lens)
    assert rec["results"]["output_tokens_per_s"] > 0 and rec["results"]["total_tokens_per_s"] > 0
    assert rec["engine"]["name"] == "tidal" and rec["engine"]["dtype"] == "float32"
    assert "output tok/s" in capsys.readouterr().out
    assert main(["bench", "compare", str(out), str(out)]) == 0


def test_bench_json_schema_argument(tmp_path):
    from tidal.bench import _bench_schema
    assert _bench_schema(None) is None
    assert _bench_schema("default")["required"] == ["records"]
    assert _bench_schema('{"type": "object"}') == {"type": "object"}
    (tmp_path / "s.json").write_text('{"type": "array"}')
    assert _bench_schema(str(tmp_path / "s.json")) == {"type": "array"}
    with pytest.raises(TidalError, match="json-schema"):
        _bench_schema("{not json")
