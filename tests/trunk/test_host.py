"""jaxai.host reads the CPU's model and matmul-relevant flags out of /proc/cpuinfo text."""
from jaxai import host

INTEL = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""

AMD = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx fma avx2 sha_ni
"""


def test_parse_cpuinfo_finds_model_cores_and_matmul_flags():
  intel = host.parse_cpuinfo(INTEL)
  assert intel == {"model": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "cores": 2,
                   "flags": ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]}
  assert host.parse_cpuinfo(AMD) == {"model": "AMD EPYC", "cores": 1, "flags": ["avx2", "fma"]}
  assert host.parse_cpuinfo("", "x86_64") == {"model": "x86_64", "cores": None, "flags": []}


def test_summary_of_this_machine_names_its_cpu():
  assert host.summary().startswith(host.cpu()["model"])
