"""Test-session setup: build the CPU kernels before any test runs, so a run never switches
from the torch ops to the compiled kernel half way (results must not depend on timing)."""
import os
import sys

os.environ.setdefault("TIDAL_CPU_KERNELS", "sync")
sys.path.insert(0, os.path.dirname(__file__))


def _install_fake_profile() -> None:
    """--policy auto needs this machine's hardware profile; tests use a fixed fake one
    (TIDAL_HARDWARE_PROFILE) instead of measuring, so they are fast and do not depend on the load."""
    import tempfile

    from fake_profiles import cpu_profile
    from tidal.plan.hardware import save_profile
    path = os.path.join(tempfile.mkdtemp(prefix="tidal-test-"), "hardware-cpu.json")
    save_profile(cpu_profile(), path)
    os.environ["TIDAL_HARDWARE_PROFILE"] = path


_install_fake_profile()
