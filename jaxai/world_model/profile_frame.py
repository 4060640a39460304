"""Where the time of one interactive frame goes on this backend: matmuls, other ops, and the gaps
between them.

  python -m jaxai.world_model.profile_frame --config=configs/world_model.py [--workdir=DIR]
      [--frames=32] [--context=32] [--top=15]

One interactive frame is one jitted call (``realtime._imagine_frame``: K denoising passes against
the KV cache, then the decode to pixels). This traces ``--frames`` of them with ``jax.profiler``
(XLA:CPU records one event per executed thunk, loop bodies included) and matches each event to its
instruction in the compiled HLO, which says whether the thunk holds a dot and how many FLOPs it
does. It prints JSON lines:

* ``frame_profile``: wall ms per frame (median of untraced calls), thunks executed per frame,
  busy ms per frame in thunks that hold a dot (``matmul``), in copies and transposes, and in
  every other op, the gap (wall minus busy: dispatch, the executor between thunks, the transfer
  of the pixels), the median thunk duration per kind, and the matmul FLOPs per frame with the
  rate they ran at.
* ``matmul_reference``: the rate of one fp32 matmul of the frame's total matmul FLOPs
  ([M, width] x [width, 4 width], M chosen so) and of a 1024^3 fp32 matmul, on this host: what
  the frame's matmuls would cost if they were as large.
* ``top_thunks``: the ``--top`` thunks by time per frame, with their source op names.

Loop and conditional thunks enclose others and are not counted as busy time. Thunks may run
concurrently on XLA:CPU's thread pool, so busy time can exceed wall time.
"""
import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from jaxai import checkpointing, cli, host
from jaxai.bench import timing
from jaxai.world_model import dynamics as dynamics_lib
from jaxai.world_model import dynamics_stage, models, realtime

CONTROL_OPS = frozenset({"while", "conditional", "call"})
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+) = (?P<type>\([^=]*\)|\w+\[[\d,]*\](?:\{[^}]*\})?) "
    r"(?P<op>[\w\-]+)\((?P<operands>[^)]*)\)(?P<rest>.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+) .*\{$")


@dataclasses.dataclass
class Instruction:
  name: str
  op: str
  shape: tuple[int, ...] | None  # None: a tuple or token result
  operands: list[str]
  calls: list[str]
  op_name: str
  rest: str


def _shape(type_text: str):
  m = re.match(r"\w+\[([\d,]*)\]", type_text)
  if not m:
    return None
  return tuple(int(d) for d in m.group(1).split(",") if d)


def parse_hlo(text: str) -> dict[str, dict[str, Instruction]]:
  """Compiled HLO text -> {computation name: {instruction name: Instruction}}."""
  computations, current = {}, None
  for line in text.splitlines():
    head = _COMPUTATION.match(line)
    if head and " = " not in line.split("{")[0]:
      current = computations.setdefault(head.group("name"), {})
      continue
    m = _INSTRUCTION.match(line)
    if m is None or current is None:
      continue
    rest = m.group("rest")
    calls = re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", rest)
    for branches in re.findall(r"branch_computations=\{([^}]*)\}", rest):
      calls += re.findall(r"%([\w.\-]+)", branches)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    current[m.group("name")] = Instruction(
        name=m.group("name"), op=m.group("op"), shape=_shape(m.group("type")),
        operands=re.findall(r"%([\w.\-]+)", m.group("operands")), calls=calls,
        op_name=op_name.group(1) if op_name else "", rest=rest)
  return computations


def dot_flops(instruction: Instruction, computation: dict[str, Instruction]) -> int:
  """2 x output elements x contracted size of a dot whose lhs is in ``computation``."""
  lhs = computation.get(instruction.operands[0])
  dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.rest)
  if lhs is None or lhs.shape is None or instruction.shape is None or dims is None:
    return 0
  contracted = math.prod(lhs.shape[int(d)] for d in dims.group(1).split(",") if d)
  return 2 * math.prod(instruction.shape) * contracted


def thunk_table(computations) -> dict[str, dict]:
  """{instruction name: {'kind', 'flops', 'op_name'}} for every instruction outside fused
  computations (the thunks XLA:CPU executes). kind: matmul (holds a dot or convolution), copy
  (copy, transpose and the fusions XLA names after them), control (encloses other thunks) or
  other."""
  def has_dot(name, seen=()):
    flops, found = 0, False
    for inst in computations.get(name, {}).values():
      if inst.op in ("dot", "convolution"):
        found, flops = True, flops + dot_flops(inst, computations[name])
      for callee in inst.calls:
        if callee not in seen:
          f, d = has_dot(callee, seen + (name,))
          flops, found = flops + f, found or d
    return flops, found

  fused = {callee for comp in computations.values() for inst in comp.values()
           if inst.op == "fusion" for callee in inst.calls}
  table = {}
  for comp_name, comp in computations.items():
    if comp_name in fused:
      continue
    for inst in comp.values():
      if inst.op in CONTROL_OPS:
        kind, flops = "control", 0
      elif inst.op in ("dot", "convolution"):
        kind, flops = "matmul", dot_flops(inst, comp)
      elif inst.op == "fusion":
        flops, found = has_dot(inst.calls[0]) if inst.calls else (0, False)
        kind = "matmul" if found else ("copy" if re.match(r"(copy|transpose)", inst.name) else "other")
      elif inst.op in ("copy", "transpose"):
        kind, flops = "copy", 0
      else:
        kind, flops = "other", 0
      table[inst.name] = {"kind": kind, "flops": flops, "op_name": inst.op_name}
  return table


def trace_events(fn, calls: int) -> list[dict]:
  """Complete ('X') events of ``calls`` calls of ``fn`` under jax.profiler."""
  with tempfile.TemporaryDirectory() as log_dir:
    jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
    for _ in range(calls):
      fn()
    jax.profiler.stop_trace()
    paths = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
      raise RuntimeError(f"jax.profiler wrote no perfetto trace under {log_dir}")
    with gzip.open(paths[0], "rt") as f:
      events = json.load(f)["traceEvents"]
  return [e for e in events if e.get("ph") == "X" and "dur" in e]


def summarise(events: list[dict], table: dict[str, dict], frames: int, wall_ms: float, top: int):
  """The frame_profile and top_thunks records of the trace of ``frames`` frames."""
  per_kind_us, durations = collections.defaultdict(float), collections.defaultdict(list)
  per_thunk_us, per_thunk_n = collections.defaultdict(float), collections.Counter()
  flops = 0
  for e in events:
    info = table.get(e["name"])
    if info is None or info["kind"] == "control":
      continue
    per_kind_us[info["kind"]] += e["dur"]
    durations[info["kind"]].append(e["dur"])
    per_thunk_us[e["name"]] += e["dur"]
    per_thunk_n[e["name"]] += 1
    flops += info["flops"]
  busy_ms = {k: per_kind_us[k] / 1e3 / frames for k in ("matmul", "copy", "other")}
  thunks = sum(len(v) for v in durations.values()) / frames
  matmul_flops = flops / frames
  profile = {
      "wall_ms_per_frame": timing.figure(wall_ms),
      "thunks_per_frame": timing.figure(thunks),
      **{f"busy_ms_{k}": timing.figure(v) for k, v in busy_ms.items()},
      "gap_ms": timing.figure(wall_ms - sum(busy_ms.values())),
      **{f"median_us_{k}": timing.figure(statistics.median(durations[k])) if durations[k] else None
         for k in ("matmul", "copy", "other")},
      **{f"thunks_{k}": timing.figure(len(durations[k]) / frames) for k in ("matmul", "copy", "other")},
      "matmul_mflop_per_frame": timing.figure(matmul_flops / 1e6),
      "matmul_gflops_in_thunks": timing.figure(matmul_flops / (busy_ms["matmul"] * 1e6))
      if busy_ms["matmul"] else None,
      "matmul_gflops_over_wall": timing.figure(matmul_flops / (wall_ms * 1e6)),
  }
  ranked = sorted(per_thunk_us.items(), key=lambda kv: -kv[1])[:top]
  top_thunks = [{"thunk": name, "kind": table[name]["kind"], "ms_per_frame": timing.figure(us / 1e3 / frames),
                 "calls_per_frame": timing.figure(per_thunk_n[name] / frames),
                 "op": "/".join(table[name]["op_name"].split("/")[-3:])}
                for name, us in ranked]
  return profile, top_thunks


def matmul_reference(flops_per_frame: float, width: int, runs: int = 20) -> dict:
  """Rates of one fp32 matmul of the frame's FLOPs ([M, width] x [width, 4 width]) and of 1024^3."""
  def rate(m, k, n):
    a = jnp.ones((m, k), jnp.float32)
    b = jnp.ones((k, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    call = lambda: jax.block_until_ready(f(a, b))
    call()
    ms = timing.median_ms(call, runs)
    return ms, 2 * m * k * n / (ms * 1e6)
  m = max(1, round(flops_per_frame / (2 * width * 4 * width)))
  frame_ms, frame_rate = rate(m, width, 4 * width)
  _, big_rate = rate(1024, 1024, 1024)
  return {"frame_sized_shape": [m, width, 4 * width], "frame_sized_ms": timing.figure(frame_ms),
          "frame_sized_gflops": timing.figure(frame_rate), "gflops_1024_cubed": timing.figure(big_rate)}


def define_flags():
  cli.define_config_flag("configs/world_model.py")
  flags.DEFINE_string("workdir", None, "A trained world-model run; default: random parameters.")
  flags.DEFINE_integer("frames", 32, "Interactive frames traced (and as many timed untraced).")
  flags.DEFINE_integer("context", 32, "Real context frames before imagining.")
  flags.DEFINE_integer("warmup", 3, "Untimed frames (compilation) first.")
  flags.DEFINE_integer("top", 15, "Thunks listed in top_thunks.")


def measure(config, workdir, *, frames: int, context: int, warmup: int, top: int):
  """Yields the JSON records."""
  if workdir:
    world_model, weights = dynamics_stage.load_world_model(config, workdir), f"trained ({workdir})"
  else:
    world_model, weights = realtime.random_world_model(config), "random init"
  r = config.rollout
  total = warmup + 2 * frames
  world = realtime.ImaginedWorld(*world_model, num_steps=r.num_steps, context_signal=r.context_signal,
                                 max_context_frames=context + total)
  rng = np.random.default_rng(0)
  world.start(rng.integers(0, 256, (context, *models.FRAME_SHAPE), np.uint8),
              rng.integers(0, dynamics_lib.NUM_CRAFTAX_ACTIONS, context))
  actions = iter(rng.integers(0, dynamics_lib.NUM_CRAFTAX_ACTIONS, total))
  step = lambda: world.step(int(next(actions)))
  for _ in range(warmup):
    step()
  times = []
  for _ in range(frames):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  wall_ms = statistics.median(times) * 1e3
  compiled = realtime._imagine_frame.lower(  # pylint: disable=protected-access
      world.tokenizer, world.dynamics, world.tokenizer_params, world.dynamics_params, world.state,
      np.int32(0), world._frame_key(0), num_steps=world.num_steps,  # pylint: disable=protected-access
      context_signal=world.context_signal).compile()
  table = thunk_table(parse_hlo(compiled.as_text()))
  profile, top_thunks = summarise(trace_events(step, frames), table, frames, wall_ms, top)
  d = config.dynamics
  common = {"backend": jax.default_backend(), "host_cpu": host.summary(), "params": weights,
            "num_steps": r.num_steps, "context": context,
            "compute_dtype": models.rollout_config(config).compute_dtype,
            "dynamics": {"width": d.width, "layers": d.num_layers, "spatial_tokens": d.spatial_tokens}}
  yield {"benchmark": "frame_profile", **common, **profile,
         "statistic": f"wall: median of {frames} untraced frames; busy: mean over {frames} traced frames"}
  yield {"benchmark": "matmul_reference", **common,
         **matmul_reference(profile["matmul_mflop_per_frame"] * 1e6, d.width)}
  yield {"benchmark": "top_thunks", **common, "thunks": top_thunks}


def main(argv):
  del argv
  args, config = cli.start("configs/world_model.py[:variant]", at_least_one=("frames", "context", "top"))
  try:
    for record in measure(config, args.workdir, frames=args.frames, context=args.context,
                          warmup=args.warmup, top=args.top):
      print(json.dumps(record), flush=True)
  except (FileNotFoundError, checkpointing.CheckpointCorrupt) as e:
    cli.fail("checkpoint error", f"{e} (train the world model into --workdir first, or leave --workdir "
             "out to profile random parameters)")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
