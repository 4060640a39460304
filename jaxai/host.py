"""What the CPU this process runs on can do, for logs and benchmark lines.

The reference 2-core machines are not all alike: on one (Intel, AMX-BF16) a 2048^3 bf16 matmul ran
at 1.34 TFLOP/s, on another (AMD EPYC, AVX2 only) at 0.13, slower than its fp32 (0.15), and the
tokenizer's training step took 382 vs 901 ms. A figure without its host cannot be compared.
"""
import functools
import platform

# Flags (as /proc/cpuinfo spells them) that decide how fast bf16 and fp32 matmuls run on XLA:CPU.
MATMUL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def parse_cpuinfo(text: str, default_model: str = "") -> dict:
  """{'model': CPU model name, 'cores': logical CPUs, 'flags': the MATMUL_FLAGS it has} of the
  text of /proc/cpuinfo."""
  model, flags, cores = default_model, set(), 0
  for line in text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key == "processor":
      cores += 1
    elif key == "model name":
      model = value.strip()
    elif key == "flags":
      flags = set(value.split())
  return {"model": model, "cores": cores or None, "flags": [f for f in MATMUL_FLAGS if f in flags]}


@functools.cache
def cpu() -> dict:
  """``parse_cpuinfo`` of this machine (off Linux: the model name from ``platform`` only)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      text = f.read()
  except OSError:
    text = ""
  return parse_cpuinfo(text, platform.processor() or platform.machine())


def summary() -> str:
  """One line for logs, e.g. 'AMD EPYC, 2 CPUs, avx2 fma'."""
  c = cpu()
  cores = f", {c['cores']} CPUs" if c["cores"] else ""
  return f"{c['model']}{cores}, {' '.join(c['flags']) or 'no avx2/avx512/amx'}"
