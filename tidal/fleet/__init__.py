"""The fleet (issue #13): what lets several tidal replicas serve as one, behind a prefix-aware router.

Owns: the KV event stream's consumer side (kv_events.py), the endpoint picker (epp/), the Envoy
ext_proc server and `tidal gateway` / `tidal cluster`. The replica-side pieces live below it:
the KV event publisher in tidal/kv/event_publisher.py, the simulated core in tidal/sim/.
Must not: be imported by the engine, the server or the model code; only tidal/cli.py reaches into it
(docs/fleet.md).
"""
