"""The `tidal chat` / `generate` start-up path (issue #12): with a warm GGUF cache it opens the checkpoint,
builds the model and loads the tokenizer without importing transformers, and parses its arguments
without importing the other subcommands' modules (server, batch, benchmarks' HTTP client)."""

import os
import subprocess
import sys

# Open smollm2 (warm cache), build the model on the meta device, load the chat tokenizer and apply the
# chat template, then report which heavy modules got imported.
_SCRIPT = """
import sys
from tidal.cli import build_parser, _light_tokenizer
args = build_parser("chat").parse_args(["chat", "hi", "--temperature", "0"])
_light_tokenizer()
import torch
from tidal.weights.loader import open_checkpoint
from tidal.model.registry import build_model
ckpt = open_checkpoint("smollm2")
build_model(ckpt.hf_config, torch.device("meta"), torch.float32)
tok = ckpt.load_tokenizer()
ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)["input_ids"]
assert ids and tok.eos_token_id == 2 and tok.decode(ids[-3:])
print(sorted(m for m in ("transformers", "httpx", "fastapi", "xgrammar", "tidal.server.cli", "tidal.batch")
             if m in sys.modules))
"""


def _run(script: str) -> str:
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ})
    assert out.returncode == 0, out.stderr[-3000:]
    return (out.stdout.strip().splitlines() or [""])[-1]


def test_chat_start_up_imports_no_transformers():
    _run("from tidal.weights.loader import open_checkpoint; open_checkpoint('smollm2')")  # warm the cache
    assert _run(_SCRIPT) == "[]"


def test_full_parser_still_has_every_command():
    from tidal.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"chat", "generate", "batch", "serve", "quantize", "plan"} <= set(sub.choices)
    only = next(a for a in build_parser("chat")._actions if a.dest == "command")
    assert set(only.choices) == {"chat", "generate"}
