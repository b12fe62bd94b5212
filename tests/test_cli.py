"""The `tidal` command: chat answers on the real model; every user error is one clear line, no traceback."""
import json
import os
import subprocess
import sys

import pytest

from tidal.weights.loader import resolve_model_path


def run_tidal(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "tidal.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("tidal: error:")]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def test_chat_answers_paris():
    # fp32: in bf16 this prompt's first token is a near tie ("The" 25.5 vs "L" 25.375 in
    # transformers' arithmetic), so one-ulp differences of fused kernels can flip it
    proc = run_tidal("chat", "What is the capital of France?", "--max-tokens", "24", "--dtype", "float32",
                     "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_sampling_flags_have_help():
    from tidal.cli import build_parser
    chat = build_parser()._subparsers._group_actions[0].choices["chat"]
    helps = {a.option_strings[0]: a.help for a in chat._actions if a.option_strings}
    for flag in ("--max-tokens", "--top-p", "--top-k", "--temperature", "--repetition-penalty", "--seed"):
        assert helps[flag] and len(helps[flag]) > 10, f"{flag} has no help text"


def test_generate_streams_completion():
    proc = run_tidal("generate", "--prompt", "The capital of France is", "--max-tokens", "8", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip()) > 0


def test_missing_model_path():
    assert_one_line_error(run_tidal("generate", "--prompt", "x", "--model", "/no/such/model"), "does not exist")


def test_bad_dtype():
    assert_one_line_error(run_tidal("generate", "--prompt", "x", "--dtype", "float8"), "dtype")


def test_cuda_without_gpu():
    if sys.modules.get("torch") is None:
        import torch  # noqa: F401
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_one_line_error(run_tidal("generate", "--prompt", "x", "--device", "cuda"), "cuda")


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "llama",
                                                       "hidden_size": 8, "num_attention_heads": 2,
                                                       "num_hidden_layers": 1, "vocab_size": 16}))
    from safetensors.torch import save_file
    import torch
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert_one_line_error(run_tidal("generate", "--prompt", "x", "--model", str(tmp_path)), "FooForCausalLM")


def test_truncated_gguf(tmp_path):
    src = resolve_model_path("smollm2")
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(os.path.getsize(src) // 2))
    assert_one_line_error(run_tidal("generate", "--prompt", "x", "--model", str(bad)), "cut.gguf")


def test_bad_size_flag():
    assert_one_line_error(run_tidal("generate", "--prompt", "x", "--kv-mem", "lots"), "kv-mem")
