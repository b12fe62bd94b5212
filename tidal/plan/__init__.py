"""Offloading policies: what they are (policy.py), what a step costs under one (cost model),
and the linear-programming search that picks one (`tidal plan` prints it; `--policy auto` runs it
when memory flags are given, from engine/resolve.resolve_policy).

Must not: import the engine, runner or server. The API the runner calls:
    profile, _, _ = tidal.plan.hardware.profile_for(engine_config)
    policy, prediction = tidal.plan.search.choose_policy(hf_config, engine_config, prompt_len, gen_len, profile)
"""
