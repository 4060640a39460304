"""Times prefill and KV-cached decoding against context length for dense, DSA and CWM-style
local/global attention, in one run (compare the ratios, not the absolute times across hosts).

  python -m jaxai.dsa.bench --config=configs/dsa.py[:variant] [--contexts=1024,2048,...,32768]
      [--topk=2048] [--chunk=1024] [--new_tokens=16] [--runs=3] [--prefill_runs=1]
      [--prefill_max=16384] [--models=dense,sparse,local_global]

Random parameters of the config's model sizes (speed does not depend on the weights), batch 1,
the config's compute dtype, the XLA path (on CPU; ``attention_impl`` as configured elsewhere).
One JSON line per (context, model):

* ``prefill_ms``: the context's L tokens written into a fresh cache in chunks of ``--chunk``
  queries (one compiled scan; each chunk attends to the cache so far), so no [L, L] array is
  built. Dense and local/global layers on XLA still compute every chunk against the whole cache
  (masked), DSA layers score every key with the indexer but attend to ``--topk``.
  Contexts above ``--prefill_max`` skip it (``prefill_ms`` null): on XLA:CPU the exact top-k of
  a chunk's indexer scores (``lax.top_k``, [1024, 32768] -> 2048 takes about 3 s) makes DSA's
  prefill at 32K take several minutes; their decode starts from a cache of random entries with
  its index at L (decode time does not depend on what the cache holds).
* ``decode_ms_per_token``: ``--new_tokens`` greedy one-token steps after the prefill (one
  compiled loop), divided by their number.
* ``cache_bytes``: the decoding cache at L + new_tokens positions (DSA's holds the indexer keys
  too; the GQA layers of local/global hold num_kv_heads heads, all positions).
* ``dense_over_this_prefill``, ``dense_over_this_decode``: dense's time over this model's, at the
  same context in this run.
Compilation is excluded: each program runs once untimed, then the median over ``--prefill_runs``
(prefill) or ``--runs`` (decode) calls.
"""
import functools
import json

import ml_collections
from absl import flags

from jaxai import cli, config_lib
from jaxai.bench import timing

MODELS = {"dense": ("dense",), "sparse": ("sparse",), "local_global": None}  # its pattern: the config's


def define_flags():
  cli.define_config_flag("configs/dsa.py")
  flags.DEFINE_list("contexts", ["1024", "2048", "4096", "8192", "16384", "32768"], "Context lengths L.")
  flags.DEFINE_list("models", list(MODELS), f"Of {', '.join(MODELS)}.")
  flags.DEFINE_integer("topk", 2048, "Keys per query of the DSA model.")
  flags.DEFINE_integer("chunk", 1024, "Queries per prefill chunk (divides every context).")
  flags.DEFINE_integer("new_tokens", 16, "Decode steps timed after the prefill.")
  flags.DEFINE_integer("runs", 3, "Timed decode calls per measurement (the median is reported).")
  flags.DEFINE_integer("prefill_runs", 1, "Timed prefill calls per measurement.")
  flags.DEFINE_integer("prefill_max", 16384, "Longest context whose prefill is timed.")


def filled_cache(model_config, index: int, max_len: int):
  """A decoding cache of random entries written up to ``index`` (what a prefill leaves, for timing)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxai.dsa import model as model_lib  # pylint: disable=g-import-not-at-top
  caches = model_lib.init_cache(model_config, 1, max_len)
  leaves, tree = jax.tree.flatten(caches)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  filled = [jax.numpy.full_like(x, index) if x.ndim == 0 else jax.random.normal(k, x.shape, x.dtype)
            for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(tree, filled)


def measure(config, *, contexts, models, topk: int, chunk: int, new_tokens: int, runs: int,
            prefill_runs: int = 1, prefill_max: int | None = None):
  """Yields the JSON records, one per (context, model)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from jaxai import host  # pylint: disable=g-import-not-at-top
  from jaxai.dsa import model as model_lib  # pylint: disable=g-import-not-at-top
  from jaxai.dsa import task  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  config.attention_impl = "xla" if jax.default_backend() == "cpu" else config.attention_impl
  m = config.model
  common = {"benchmark": "dsa_context", "backend": jax.default_backend(), "host_cpu": host.summary(),
            "compute_dtype": config.compute_dtype, "batch": 1, "chunk": chunk, "new_tokens": new_tokens,
            "model": {"width": m.width, "layers": m.num_layers, "heads": m.num_heads, "head_dim": m.head_dim,
                      "kv_heads_local_global": m.num_kv_heads, "window": m.window, "topk": topk,
                      "indexer_heads": m.indexer_heads, "indexer_dim": m.indexer_dim},
            "params": "random init (speed does not depend on the weights)",
            "statistic": f"median over {prefill_runs} prefill and {runs} decode calls after a compiling one"}
  rng = np.random.default_rng(0)
  for context in contexts:
    tokens = jnp.asarray(rng.integers(0, 256, (1, context)), jnp.int32)
    dense_ms = None  # (prefill, decode per token) of dense at this context: models list it first
    for name in models:
      pattern = task.layer_pattern(config, "local_global") if name == "local_global" else MODELS[name]
      mc = dataclasses.replace(task.model_config(config, pattern), topk=topk)
      model = model_lib.LongContextLM(mc)
      init = jax.jit(model.init, compiler_options={"xla_backend_optimization_level": 0})
      params = nn.unbox(init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
      apply = lambda p, t, c: model.apply({"params": p}, t, c, mutable=["losses"])[0]

      @jax.jit
      def prefill(params, tokens):
        cache = model_lib.init_cache(mc, 1, context + new_tokens)
        def one(cache, chunk_tokens):
          logits, cache = apply(params, chunk_tokens[None], cache)
          return cache, logits[0, -1]
        cache, last = jax.lax.scan(one, cache, tokens[0].reshape(-1, chunk))
        return last[-1], cache

      @jax.jit
      def decode(params, logits, cache):
        def one(carry, _):
          logits, cache = carry
          token = jnp.argmax(logits).astype(jnp.int32).reshape(1, 1)
          logits, cache = apply(params, token, cache)
          return (logits[0, -1], cache), None
        return jax.lax.scan(one, (logits, cache), None, length=new_tokens)[0]

      prefill_ms = None
      if prefill_max is None or context <= prefill_max:
        logits, cache = jax.block_until_ready(prefill(params, tokens))
        prefill_ms = timing.median_ms(lambda: jax.block_until_ready(prefill(params, tokens)), prefill_runs)
      else:
        logits, cache = jnp.zeros((256,), jnp.float32), filled_cache(mc, context, context + new_tokens)
      jax.block_until_ready(decode(params, logits, cache))
      decode_ms = timing.median_ms(lambda: jax.block_until_ready(decode(params, logits, cache)), runs)
      per_token = decode_ms / new_tokens
      if name == "dense":
        dense_ms = (prefill_ms, per_token)
      record = {**common, "context": context, "attention": name,
                "prefill_ms": None if prefill_ms is None else timing.figure(prefill_ms),
                "decode_ms_per_token": timing.figure(per_token),
                "cache_bytes": int(sum(x.nbytes for x in jax.tree.leaves(cache)))}
      if dense_ms is not None:
        dense_prefill, dense_decode = dense_ms
        if prefill_ms is not None and dense_prefill is not None:
          record["dense_over_this_prefill"] = timing.figure(dense_prefill / prefill_ms)
        record["dense_over_this_decode"] = timing.figure(dense_decode / per_token)
      yield record


def main(argv):
  del argv
  args, config = cli.start("configs/dsa.py[:variant]",
                           at_least_one=("topk", "chunk", "new_tokens", "runs", "prefill_runs"))
  try:
    contexts = [int(c) for c in args.contexts]
  except ValueError:
    cli.fail("config error", f"contexts: must be comma-separated integers, got {','.join(args.contexts)}")
  bad = [c for c in contexts if c < 1 or c % args.chunk]
  if bad:
    cli.fail("config error", f"contexts: {bad} are not positive multiples of --chunk={args.chunk}")
  unknown = [m for m in args.models if m not in MODELS]
  if unknown or not args.models:
    cli.fail("config error", f"models: {unknown or 'none given'}; choose from {', '.join(MODELS)}")
  models = sorted(args.models, key=lambda m: m != "dense")  # dense first: the others' ratios use it
  for record in measure(config, contexts=contexts, models=models, topk=args.topk, chunk=args.chunk,
                        new_tokens=args.new_tokens, runs=args.runs, prefill_runs=args.prefill_runs,
                        prefill_max=args.prefill_max):
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
