"""Offloading policies: what they are (policy.py), what a step costs under one (cost model),
and the linear-programming search that picks one (`tidal plan`; its policy string goes to
`--policy`. `--policy auto` does not call it yet: engine/offload_runner.py says why).

Must not: import the engine, runner or server. The API a runner would call:
    profile, _, _ = tidal.plan.hardware.profile_for(engine_config)
    policy, prediction = tidal.plan.search.choose_policy(hf_config, engine_config, prompt_len, gen_len, profile)
"""
