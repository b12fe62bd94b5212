"""Fixed fake hardware profiles (a T4-like GPU box, a 2-core CPU) for the planner: tests never
measure hardware. conftest.py installs cpu_profile() as this machine's cached profile, so an engine
under --policy auto plans with it instead of measuring."""
from tidal.plan.hardware import HardwareProfile

GiB = 2**30


def gpu_profile(**kw) -> HardwareProfile:
    fields = dict(device="cuda:0", device_name="fake T4", unified_memory=False,
                  matmul_flops={"float32": 8e12, "float16": 40e12, "bfloat16": 40e12, "int8": 30e12, "int4": 30e12},
                  gemv_bw={"float32": 280e9, "float16": 280e9, "bfloat16": 280e9, "int8": 200e9, "int4": 150e9},
                  attn_bw=250e9, cpu_matmul_flops={"float32": 1e12, "bfloat16": 1e12}, cpu_attn_bw=80e9,
                  h2d_bw=12e9, d2h_bw=12e9, disk_read_bw=2e9, disk_write_bw=1.5e9, disk_read_cached_bw=10e9,
                  layer_overhead_s=5e-5, device_capacity=15 * GiB, host_capacity=200 * GiB,
                  disk_capacity=1500 * GiB, threads=16)
    return HardwareProfile(**{**fields, **kw})


def cpu_profile(**kw) -> HardwareProfile:
    fields = dict(device="cpu", device_name="fake 2-core", unified_memory=True,
                  matmul_flops={"float32": 180e9, "bfloat16": 400e9, "int8": 70e9, "int4": 100e9},
                  gemv_bw={"float32": 18e9, "bfloat16": 15e9, "int8": 8e9, "int4": 19e9}, attn_bw=40e9,
                  cpu_matmul_flops={"float32": 180e9, "bfloat16": 400e9}, cpu_attn_bw=40e9, h2d_bw=20e9,
                  d2h_bw=20e9, disk_read_bw=2e9, disk_write_bw=1.5e9, disk_read_cached_bw=12e9,
                  layer_overhead_s=2e-4, device_capacity=20 * GiB, host_capacity=20 * GiB, disk_capacity=70 * GiB,
                  threads=2)
    return HardwareProfile(**{**fields, **kw})
