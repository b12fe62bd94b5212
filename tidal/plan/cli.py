"""`tidal plan`: pick (or cost) an offloading policy for a model, machine and workload, and print it.

Owns: the subcommand's flags (engine flags keep config.ENGINE_FLAGS' names and help), loading or
measuring the hardware profile, and the printed report and JSON record.
Must not: run the model or the engine; it reads only the checkpoint's config.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from tidal.errors import TidalError

_ENGINE = ("model", "device", "dtype", "device_mem", "host_mem", "offload_dir", "policy", "quant", "kv_quant",
           "max_num_seqs")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from tidal.config import ENGINE_FLAGS
    p = subparsers.add_parser(
        "plan", help="offloading planner: the best policy for --device-mem / --host-mem / --offload-dir",
        description="Search an offloading policy (placement of weights, KV cache and activations over device, "
                    "host and disk; batching; compression) with a cost model of this machine, measured once "
                    "by --profile and cached. With --policy STRING it costs that policy instead.")
    g = p.add_argument_group("engine")
    for name, typ, help_text in ENGINE_FLAGS:
        if name in _ENGINE:
            g.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                           help=help_text + (" (the most sequences in flight, bs x mb; default 64)"
                                             if name == "max_num_seqs" else ""))
    w = p.add_argument_group("workload and planner")
    w.add_argument("--prompt-len", type=int, default=512, help="prompt tokens a sequence (default 512)")
    w.add_argument("--gen-len", type=int, default=32, help="generated tokens a sequence (default 32)")
    w.add_argument("--disk-mem", default=None, help="disk budget under --offload-dir (default: its free space)")
    w.add_argument("--no-compress", action="store_true", help="do not consider int8/int4 weights or KV cache")
    w.add_argument("--profile", action="store_true", help="re-measure this machine (about 10 s) and cache it")
    w.add_argument("--hardware", default=None, metavar="PATH", help="use this hardware profile JSON instead")
    w.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the plan as JSON here")
    p.set_defaults(func=run)
    return p


def _profile(args, cfg):
    from tidal.plan.hardware import load_profile, profile_for
    if args.hardware:
        return load_profile(args.hardware), args.hardware, False
    return profile_for(cfg, remeasure=args.profile)


def _hf_config(model: str):
    """The model's transformers config; a directory needs only its config.json (plan a model before
    downloading it: the weights are never read)."""
    from tidal.weights.loader import open_checkpoint, resolve_model_path
    path = resolve_model_path(model)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        from transformers import AutoConfig
        try:
            return AutoConfig.from_pretrained(path)
        except Exception as e:  # bad JSON, unknown model_type: the user's file
            raise TidalError(f"cannot read '{path}/config.json' ({type(e).__name__}: {e})", param="model")
    return open_checkpoint(model).hf_config


def _checkpoint_or_none(model: str):
    from tidal.weights.loader import open_checkpoint
    try:
        return open_checkpoint(model, require_weights=False)
    except TidalError:
        return None


def run(args) -> int:
    from tidal.config import EngineConfig, parse_size
    from tidal.plan.cost_model import predict
    from tidal.plan.model_spec import model_spec
    from tidal.policy import Policy
    from tidal.plan.limits import disk_limit_for, fits, limits_for
    from tidal.plan.search import choose_policy

    kwargs = {n: getattr(args, n) for n in _ENGINE if getattr(args, n, None) is not None}
    cfg = EngineConfig.from_kwargs(**kwargs)
    hf_config = _hf_config(cfg.model)
    prof, prof_path, fresh = _profile(args, cfg)
    disk_limit = parse_size(args.disk_mem, "disk_mem")
    if disk_limit is None:  # the disk the engine's runner would stream from (a safetensors checkpoint in place)
        disk_limit = disk_limit_for(cfg, _checkpoint_or_none(cfg.model))
    if cfg.policy == "auto":
        policy, pred = choose_policy(hf_config, cfg, args.prompt_len, args.gen_len, prof,
                                     allow_compression=not args.no_compress, disk_limit=disk_limit, progress=True)
    else:
        spec = model_spec(hf_config)
        policy = Policy.parse(cfg.policy)
        if policy.batch_size == 0:
            policy = policy.with_(batch_size=cfg.max_num_seqs)
        pred = predict(spec, prof, cfg.torch_dtype, args.prompt_len, args.gen_len, policy,
                       limits_for(cfg, prof, disk_limit))
        if not fits(pred, pred.limits):
            print("tidal plan: warning: this policy does not fit the memory limits (see the table)", file=sys.stderr)
    if fresh:
        print(prof.summary())
    print(format_report(cfg, hf_config, pred, prof_path, prof, args.prompt_len, args.gen_len))
    if args.json_path:
        record = {"model": cfg.model, "dtype": str(cfg.torch_dtype).removeprefix("torch."),
                  "device": str(cfg.torch_device), "workload": {"prompt_len": args.prompt_len, "gen_len": args.gen_len},
                  "policy": str(policy), "prediction": pred.to_dict(), "hardware_path": prof_path,
                  "hardware": prof.to_dict()}
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    return 0


def format_report(cfg, hf_config, pred, prof_path: str, prof, prompt_len: int, gen_len: int) -> str:
    from tidal.plan.model_spec import model_spec
    from tidal.plan.limits import format_bytes as size
    spec = model_spec(hf_config)
    dt = str(cfg.torch_dtype).removeprefix("torch.")
    p = pred.policy
    lines = [
        f"model      {cfg.model} ({spec.arch}, {spec.num_layers} layers, "
        f"{size(spec.weight_bytes(cfg.torch_dtype.itemsize))}"
        f" of weights in {dt}), on {cfg.torch_device}",
        f"workload   prompt {prompt_len} + generate {gen_len} tokens a sequence",
        f"hardware   {prof_path} (measured {prof.measured_at or '?'})",
        f"policy     {p}",
        f"predicted  {pred.tokens_per_s:,.1f} tok/s generated, batch {pred.batch} = {max(p.batch_size, 1)} x "
        f"{p.num_micro_batches} micro-batches",
        f"           prefill {pred.prefill_s:,.2f} s ({pred.bottleneck['prefill']}-bound) + decode "
        f"{pred.decode_s:,.2f} s ({pred.bottleneck['decode']}-bound) = {pred.total_s:,.2f} s a batch",
        "",
        f"{'tier':<8}{'limit':>12}{'weights':>12}{'KV cache':>12}{'activations':>13}{'buffers':>12}{'total':>12}",
    ]
    for tier, parts in pred.memory_parts.items():
        lim = pred.limits.get(tier)
        lines.append(f"{tier:<8}{size(lim):>12}{size(parts['weights']):>12}{size(parts['kv']):>12}"
                     f"{size(parts['act']):>13}{size(parts['buffers']):>12}{size(pred.memory[tier]):>12}")
    if pred.limits.get("ram") is not None:
        lines.append(f"(device and host are the same RAM here: together at most {size(pred.limits['ram'])})")
    return "\n".join(lines)


def main(argv=None) -> int:  # `python -m tidal.plan.cli`, for debugging without the top-level CLI
    parser = argparse.ArgumentParser(prog="tidal")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TidalError as e:
        print(f"tidal: error: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
