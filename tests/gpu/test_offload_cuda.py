"""Offloading on CUDA (skipped without it): weights in pinned host memory and mapped from disk,
copied in on a side stream; the KV cache on the host with CPU attention or gathered blocks; the
zig-zag schedule. Each run's greedy tokens equal the all-resident run's (fp32), and at most two
streamed layers take device memory. A tiny random Llama, no tokenizer (runner level)."""
import pytest
import torch
import transformers

from tidal.config import EngineConfig
from tidal.engine.model_runner import ModelRunner
from tidal.sampling import SamplingParams
from model_utils import ManualScheduler   # tests/ is on sys.path (conftest.py)

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")
NUM_LAYERS = 6
PROMPTS = [[(7 * i + 3 * j) % 120 + 2 for j in range(3 + 5 * i)] for i in range(8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=NUM_LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path, max_shard_size="200KB")
    return str(path)


def greedy(runner: ModelRunner, prompts=PROMPTS, new_tokens: int = 6) -> list[list[int]]:
    """All prompts in one batch, prefill then decode steps through runner.execute_model (both schedules)."""
    runner.eos_token_ids = []
    sched = ManualScheduler(runner.num_blocks, runner.block_size, {str(i): list(p) for i, p in enumerate(prompts)},
                            SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    out = sched.run(runner)
    return [out[str(i)] for i in range(len(prompts))]


def _runner(model_dir, policy="auto", **kw):
    cfg = EngineConfig(model=model_dir, device=DEVICE, dtype="float32", num_kv_blocks=128, block_size=4,
                       policy=policy, **kw)
    return ModelRunner(cfg)


@pytest.fixture(scope="module")
def resident(model_dir):
    return greedy(_runner(model_dir))


@pytest.mark.parametrize("policy", ["w=0,50,50", "w=0,0,100 mb=4", "w=20,40,40 mb=2",
                                    "w=0,100,0 kv=0,100,0 cpu-attn=on", "w=50,50,0 kv=50,50,0 cpu-attn=off mb=2"])
def test_offloaded_on_device_equals_resident(model_dir, resident, policy):
    runner = _runner(model_dir, policy)
    assert greedy(runner) == resident
    assert runner.prefetcher.stats["peak_bound"] <= 2
    streamed = runner.placement.streamed.values()
    assert sum(any(t.numel() > 0 for t in s.layout.current()) for s in streamed) <= 2
    assert all(t.device.type == "cpu" for s in streamed if s.host_buffer is not None for t in [s.host_buffer])
    if "kv=" in policy:
        assert any(k.device.type == "cpu" for k, _ in runner.kv_caches)


def test_device_working_set_is_two_layers(model_dir):
    if DEVICE != "cuda":
        pytest.skip("device memory is CUDA's")
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    runner = _runner(model_dir, "w=0,0,100")
    layer_bytes = max(s.layout.nbytes for s in runner.placement.streamed.values())
    kv = sum(k.numel() * k.element_size() * 2 for k, _ in runner.kv_caches)
    used = torch.cuda.memory_allocated() - base - kv
    non_layer = sum(p.numel() * p.element_size() for n, p in runner.model.named_parameters() if not n.startswith("layers."))
    assert used <= non_layer + 2 * layer_bytes + (1 << 20)
