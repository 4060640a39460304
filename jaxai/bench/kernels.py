"""Times the Pallas kernels against their plain-jnp references and dense XLA attention.

  python -m jaxai.bench.kernels [--only=block_causal,sparse_attention,indexer,shortcut]
      [--implementations=reference,dense_xla,pallas,pallas_key_major]
      [--batch=2 --seq_len=4096 --heads=16 --kv_heads=4 --head_dim=128 --frame_size=256 ...]

On a GPU or TPU, ``pallas`` is the kernel's dialect for that backend; the shortcut-forcing loss
has only a GPU kernel, and ``pallas_key_major`` (GPU only) is the sparse attention with its
backward without atomics. Prints one JSON line per measurement: kernel, implementation,
pass (fwd | fwd+bwd), shapes, dtype, backend, median milliseconds over --runs timed calls after
--warmup untimed ones, and TFLOP/s counted on the attended (unmasked) work only, so a dense
implementation that computes masked entries too shows a lower rate for the same job. The
shortcut-forcing loss is memory-bound and reports GB/s read instead. On CPU, Pallas runs only in
interpret mode, which is not a timing: there only the XLA paths are timed, with small shapes.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from jaxai import cli, host
from kernels_pallas import block_causal_attention as bca
from kernels_pallas import shortcut_forcing as sf
from kernels_pallas import sparse_topk_attention as dsa

KERNELS = ("block_causal", "sparse_attention", "indexer", "shortcut")
IMPLEMENTATIONS = ("reference", "dense_xla", "pallas", "pallas_key_major")

CPU_SHAPES = dict(batch=1, seq_len=256, heads=4, kv_heads=2, head_dim=64, frame_size=16,
                  window_frames=None, soft_cap=None, top_k=32, indexer_heads=4, indexer_dim=64,
                  tokens=64, channels=16, frames=16, dtype="float32")
ACCELERATOR_SHAPES = dict(batch=2, seq_len=4096, heads=16, kv_heads=4, head_dim=128,
                          frame_size=256, window_frames=None, soft_cap=None, top_k=2048,
                          indexer_heads=64, indexer_dim=128, tokens=256, channels=32, frames=64,
                          dtype="bfloat16")


@dataclasses.dataclass
class _Case:
  """One kernel on one set of inputs, timed for each implementation in `impls`."""
  kernel: str
  impls: dict  # implementation name -> fn(*args)
  args: tuple
  cotangent: jax.Array  # of the output, for the backward pass
  num_diff: int  # the first num_diff args are differentiated
  shapes: dict
  dtype: jnp.dtype
  flops: int | None = None  # forward work actually attended
  fwd_bwd_flops_factor: float = 3.5  # attention: backward is 5 matmuls against the forward's 2
  bytes_read: int | None = None  # forward, for memory-bound kernels


def _median_seconds(fn, args, *, warmup, runs):
  fn = jax.jit(fn).lower(*args).compile()  # compilation is never part of a timing
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _with_backward(fn, num_args):
  """fn's forward and the vjp to its first num_args inputs, for a fixed output cotangent."""
  def run(*args_and_cotangent):
    *args, cotangent = args_and_cotangent
    out, vjp = jax.vjp(lambda *diff: fn(*diff, *args[num_args:]), *args[:num_args])
    return out, vjp(cotangent)
  return run


def _visible_pairs(seq_len, frame_size, window_frames):
  """Number of (query, key) pairs the block-causal mask keeps, in O(seq_len)."""
  frame = np.arange(seq_len) // frame_size
  end = np.minimum((frame + 1) * frame_size, seq_len)
  start = 0 if window_frames is None else np.maximum(frame - window_frames + 1, 0) * frame_size
  return int(np.sum(end - start))


def _block_causal_cases(s, xla_only):
  b, t, h, kv, d = s["batch"], s["seq_len"], s["heads"], s["kv_heads"], s["head_dim"]
  dtype = jnp.dtype(s["dtype"])
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, t, h, d), dtype)
  k, v = (jax.random.normal(key, (b, t, kv, d), dtype) for key in keys[1:3])
  do = jax.random.normal(keys[3], q.shape, dtype)
  options = dict(frame_size=s["frame_size"], window_frames=s["window_frames"],
                 soft_cap=s["soft_cap"])
  mask = bca.block_causal_mask(t, s["frame_size"], s["window_frames"])[None, None]
  impls = {
      "reference": lambda q, k, v: bca.reference_block_causal_attention(q, k, v, **options),
      # jax.nn.dot_product_attention has no soft-cap: timed with the same mask, without the cap.
      "dense_xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask),
  }
  if not xla_only:
    impls["pallas"] = lambda q, k, v: bca.block_causal_attention(q, k, v, **options)
  flops = 4 * b * h * d * _visible_pairs(t, s["frame_size"], s["window_frames"])
  return [_Case("block_causal_attention", impls, (q, k, v), do, 3,
                dict(q=q.shape, kv=k.shape, **options), dtype, flops)]


def _sparse_attention_cases(s, xla_only):
  b, t, h, d, top_k = s["batch"], s["seq_len"], s["heads"], s["head_dim"], s["top_k"]
  dtype = jnp.dtype(s["dtype"])
  keys = jax.random.split(jax.random.key(1), 5)
  q = jax.random.normal(keys[0], (b, t, h, d), dtype)
  k, v = (jax.random.normal(key, (b, t, 1, d), dtype) for key in keys[1:3])
  do = jax.random.normal(keys[3], q.shape, dtype)
  scores = jax.random.normal(keys[4], (b, t, t))  # stands in for the indexer: any ranking works
  indices = dsa.select_topk_indices(scores, top_k)
  # Dense mask of the selection; the extra last column takes the -1 ("no key") entries.
  selected = jnp.zeros((b, t, t + 1), bool).at[
      jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None], indices].set(True)[..., :t]
  impls = {
      "reference": lambda q, k, v: dsa.reference_sparse_topk_attention(q, k, v, indices),
      "dense_xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v,
                                                                mask=selected[:, None]),
  }
  if not xla_only:
    impls["pallas"] = lambda q, k, v: dsa.sparse_topk_attention(q, k, v, indices)
    if jax.default_backend() == "gpu":  # the backward without atomics, against the atomic one
      impls["pallas_key_major"] = lambda q, k, v: dsa.sparse_topk_attention(
          q, k, v, indices, gpu_backward="key_major")
  flops = 4 * h * d * int(jnp.sum(indices >= 0))
  return [_Case("sparse_topk_attention", impls, (q, k, v), do, 3,
                dict(q=q.shape, kv=k.shape, top_k=top_k), dtype, flops)]


def _indexer_cases(s, xla_only):
  b, t, h, d = s["batch"], s["seq_len"], s["indexer_heads"], s["indexer_dim"]
  dtype = jnp.dtype(s["dtype"])
  keys = jax.random.split(jax.random.key(2), 4)
  q = jax.random.normal(keys[0], (b, t, h, d), dtype)
  k = jax.random.normal(keys[1], (b, t, d), dtype)
  w = jax.random.normal(keys[2], (b, t, h), dtype)
  ds = jax.random.normal(keys[3], (b, t, t))
  causal_pairs = b * t * (t + 1) // 2
  cases = []
  for precision in ("default", "fp8"):
    impls = {"reference": lambda q, k, w, p=precision: dsa.reference_lightning_indexer_scores(
        q, k, w, precision=p)}
    if not xla_only:
      impls["pallas"] = lambda q, k, w, p=precision: dsa.lightning_indexer_scores(
          q, k, w, precision=p)
    # Backward: dq and dk, one matmul each, against the forward's one.
    cases.append(_Case("lightning_indexer", impls, (q, k, w), ds, 3,
                       dict(q_index=q.shape, k_index=k.shape, precision=precision), dtype,
                       2 * h * d * causal_pairs, fwd_bwd_flops_factor=3.0))
  return cases


def _shortcut_cases(s, xla_only):
  b, t, n, c = s["batch"], s["frames"], s["tokens"], s["channels"]
  dtype = jnp.dtype(s["dtype"])
  keys = jax.random.split(jax.random.key(3), 7)
  values = [jax.random.normal(key, (b, t, n, c), dtype) for key in keys[:5]]
  d = 1.0 / 2 ** jax.random.randint(keys[5], (b, t), 0, 7)
  tau = jnp.floor(jax.random.uniform(keys[6], (b, t)) / d) * d
  frame_inputs = (tau, d, jnp.ones((b, t)))
  impls = {"reference": lambda *a: sf.reference_shortcut_forcing_loss(*a, d_min=1 / 64)}
  if not xla_only and jax.default_backend() in sf.PLATFORMS:  # a GPU kernel only
    impls["pallas"] = lambda *a: sf.shortcut_forcing_loss(*a, d_min=1 / 64)
  return [_Case("shortcut_forcing_loss", impls, (*values, *frame_inputs), jnp.ones((b, t)), 1,
                dict(pred=values[0].shape), dtype,
                bytes_read=5 * values[0].size * dtype.itemsize)]


def _round(x):
  return float(f"{x:.4g}")


def _measure(case, *, backend, warmup, runs, implementations):
  for impl in implementations:
    if impl not in case.impls:
      continue
    fn = case.impls[impl]
    for pass_name, timed, args, work_factor in [
        ("fwd", fn, case.args, 1.0),
        ("fwd+bwd", _with_backward(fn, case.num_diff), (*case.args, case.cotangent),
         case.fwd_bwd_flops_factor)]:
      seconds = _median_seconds(timed, args, warmup=warmup, runs=runs)
      record = {"kernel": case.kernel, "implementation": impl, "pass": pass_name,
                "backend": backend, "device": jax.devices()[0].device_kind,
                "host_cpu": host.summary(), "dtype": jnp.dtype(case.dtype).name,
                "shapes": {k: list(v) if isinstance(v, tuple) else v
                           for k, v in case.shapes.items()},
                "median_ms": _round(seconds * 1e3), "runs": runs}
      if case.flops is not None:
        record["tflops_per_s"] = _round(case.flops * work_factor / seconds / 1e12)
      if case.bytes_read is not None:  # the backward pass reads the inputs once more
        record["gb_per_s"] = _round(case.bytes_read * (1 if pass_name == "fwd" else 2)
                                    / seconds / 1e9)
      print(json.dumps(record), flush=True)


def _parse(argv):
  """absl flags in their own FlagValues: ``main`` can be called more than once in a process."""
  fv = flags.FlagValues()
  flags.DEFINE_string("only", ",".join(KERNELS), f"comma-separated subset of {','.join(KERNELS)}",
                      flag_values=fv)
  flags.DEFINE_string("implementations", ",".join(IMPLEMENTATIONS), "comma-separated subset of "
                      f"{','.join(IMPLEMENTATIONS)}, timed in this order (long sequences: the "
                      "gather-based references need memory of order seq_len * top_k * head_dim)",
                      flag_values=fv)
  flags.DEFINE_integer("warmup", 2, "untimed calls before timing", flag_values=fv)
  flags.DEFINE_integer("runs", 5, "timed calls", flag_values=fv)
  for key, value in ACCELERATOR_SHAPES.items():
    define = flags.DEFINE_string if key == "dtype" else flags.DEFINE_float if key == "soft_cap" \
        else flags.DEFINE_integer
    define(key, None, f"default {CPU_SHAPES[key]} on CPU, {value} on GPU/TPU", flag_values=fv)
  try:
    fv([sys.argv[0] if sys.argv else "bench", *argv])
  except flags.Error as e:
    cli.fail("config error", f"flags: {e}")
  unknown = set(fv.only.split(",")) - set(KERNELS)
  if unknown:
    cli.fail("config error", f"only: unknown kernels {sorted(unknown)}; choose from {', '.join(KERNELS)}")
  unknown = set(fv.implementations.split(",")) - set(IMPLEMENTATIONS)
  if unknown:
    cli.fail("config error", f"implementations: unknown {sorted(unknown)}; choose from "
             f"{', '.join(IMPLEMENTATIONS)}")
  return fv


def main(argv=None):
  args = _parse(sys.argv[1:] if argv is None else argv)
  backend = jax.default_backend()
  xla_only = backend == "cpu"
  shapes = dict(CPU_SHAPES if xla_only else ACCELERATOR_SHAPES)
  shapes.update({key: getattr(args, key) for key in shapes if getattr(args, key) is not None})
  if xla_only:
    print(json.dumps(dict(backend=backend, note="Pallas runs only in interpret mode on CPU, "
                          "which is not a timing: timing the XLA paths (reference, dense_xla) "
                          "only")), flush=True)
  builders = dict(block_causal=_block_causal_cases, sparse_attention=_sparse_attention_cases,
                  indexer=_indexer_cases, shortcut=_shortcut_cases)
  for kernel in args.only.split(","):
    for case in builders[kernel](shapes, xla_only):
      _measure(case, backend=backend, warmup=args.warmup, runs=args.runs,
               implementations=args.implementations.split(","))


if __name__ == "__main__":
  main(sys.argv[1:])
