"""Offloading policies: what they are (policy.py), what a step costs under one (cost model),
and the linear-programming search that picks one (`tidal plan`, `--policy auto`).

Must not: import the engine, runner or server; the runner asks this package for a policy.
"""
