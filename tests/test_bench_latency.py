"""`tidal bench latency`: one stream, TTFT and decode tokens/s, the same record shape the peers write."""
import json

import pytest

from tidal.bench_latency import latency_results, latency_workload
from tidal.bench_record import format_latency_table
from tidal.cli import main
from tidal.errors import TidalError


def test_latency_workload_is_fresh_per_iteration_and_exact_length():
    w = latency_workload(32, 8, 3, seed=0, vocab_size=1000)
    assert len(w.prompts) == 4 and all(len(p) == 32 for p in w.prompts)   # 3 timed + 1 warmup
    assert len({tuple(p) for p in w.prompts}) == 4                            # no prefix-cache hits
    assert w.prompts == latency_workload(32, 8, 3, seed=0, vocab_size=1000).prompts
    with pytest.raises(TidalError):
        latency_workload(32, 1, 3, seed=0, vocab_size=1000)


def test_latency_results_are_medians():
    r = latency_results([0.5, 0.1, 0.2], [1.0, 2.0, 4.0], output_len=9, prompt_len=100, load_s=1.0)
    assert r["ttft_s"] == 0.2 and r["prefill_tokens_per_s"] == 500.0
    assert r["decode_tokens_per_s"] == 4.0 and r["tpot_ms"] == 250.0


def test_bench_latency_end_to_end(tmp_path, capsys):
    out = tmp_path / "lat.json"
    assert main(["bench", "latency", "--input-len", "24", "--output-len", "6", "--num-iters", "2",
                 "--dtype", "float32", "--max-model-len", "128", "--num-kv-blocks", "32", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["benchmark"] == "latency" and rec["engine"]["name"] == "tidal"
    res = rec["results"]
    assert len(res["ttft_all_s"]) == 2 and res["ttft_s"] > 0 and res["decode_tokens_per_s"] > 0
    assert "decode tok/s" in capsys.readouterr().out
    # compare prints latency records side by side and refuses to mix benchmark kinds
    assert main(["bench", "compare", str(out), str(out)]) == 0
    assert "TTFT" in format_latency_table([rec, rec])
    thr = dict(rec, benchmark="throughput")
    (tmp_path / "thr.json").write_text(json.dumps(thr))
    assert main(["bench", "compare", str(out), str(tmp_path / "thr.json")]) == 2
