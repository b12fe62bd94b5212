"""Test-session setup: build the CPU kernels before any test runs, so a run never switches
from the torch ops to the compiled kernel half way (results must not depend on timing)."""
import os
import sys

os.environ.setdefault("TIDAL_CPU_KERNELS", "sync")
sys.path.insert(0, os.path.dirname(__file__))
