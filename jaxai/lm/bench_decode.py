"""Times KV-cached decoding of the decoder LM: prefill, then greedy decode, per batch size.

  python -m jaxai.lm.bench_decode --config=configs/lm.py[:variant] [--workdir=DIR]
      [--prompt_len=128] [--new_tokens=128] [--batches=1,32] [--runs=3]

With ``--workdir`` the trained ``lm`` stage of that run is timed; without, random parameters of
the config's sizes (speed does not depend on the weights), and every line says which. Prints one
JSON line per batch size, on one device, in the config's compute dtype: random prompts of
``--prompt_len`` bytes each, no stop tokens, so every row generates ``--new_tokens`` tokens.

* ``prefill_ms``: ``sampling.prefill`` of the batch (the prompts in one pass into a fresh cache).
* ``decode_ms``: ``sampling.decode`` after it (the first token from the prefill's logits, then
  new_tokens - 1 cached one-token passes); ``decode_ms_per_token`` = decode_ms / new_tokens and
  ``decode_tokens_per_s`` = new_tokens x batch / decode_ms. Compilation is excluded: each program
  runs once untimed, then the median over ``--runs`` calls.
* At batch 1 (with ``--recompute``): ``recompute_ms``, the same greedy tokens generated without a
  cache, each one by the full forward pass over the fixed [1, prompt_len + new_tokens] buffer
  (one compiled program; the positions not yet generated are causally invisible, so the tokens
  are the cached ones: ``recompute_tokens_agree`` counts the leading tokens that are the same, all
  of them in float32; in bfloat16 the two programs round differently and may part at a near-tie), and
  ``recompute_over_cached`` = recompute_ms / (prefill_ms + decode_ms). A recompute over exactly
  the tokens so far would cost a fraction, between prompt_len / (prompt_len + new_tokens) and 1,
  of the fixed buffer's.
"""
import functools
import json

from absl import flags

from jaxai import cli, config_lib
from jaxai.bench import timing


def define_flags():
  cli.define_config_flag("configs/lm.py")
  flags.DEFINE_string("workdir", None, "A trained LM run; default: random parameters.")
  flags.DEFINE_integer("prompt_len", 128, "Prompt bytes per row.")
  flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row.")
  flags.DEFINE_list("batches", ["1", "32"], "Batch sizes, one JSON line each.")
  flags.DEFINE_integer("runs", 3, "Timed calls per measurement (the median is reported).")
  flags.DEFINE_bool("recompute", True, "At batch 1, also time decoding without a cache.")


def greedy_uncached(model, params, tokens, *, new_tokens: int):
  """[B, new_tokens] greedy tokens after prompts [B, L] (all of length L), each from the plain
  forward pass over the whole [B, L + new_tokens] buffer: the baseline the cache saves."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  width = tokens.shape[1]
  buffer = jnp.concatenate([tokens, jnp.zeros((tokens.shape[0], new_tokens), tokens.dtype)], axis=1)

  def step(i, buffer):
    logits = model.apply({"params": params}, buffer)
    last = jax.lax.dynamic_index_in_dim(logits, width + i - 1, axis=1, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(buffer, jnp.argmax(last, -1).astype(buffer.dtype),
                                               width + i, axis=1)
  return jax.lax.fori_loop(0, new_tokens, step, buffer)[:, width:]


def measure(config, workdir: str | None, *, prompt_len: int, new_tokens: int, batches, runs: int,
            recompute: bool):
  """Yields the JSON records, one per batch size."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from jaxai import host, stages  # pylint: disable=g-import-not-at-top
  from jaxai.lm import sampling, task  # pylint: disable=g-import-not-at-top
  if workdir:
    trained = stages.load_stage(config, workdir, "lm", sections=("model",))
    config, params = stages.stage_config(trained.config, "lm"), trained.params
    weights = f"trained ({workdir}, step {trained.step})"
  else:
    config = stages.stage_config(config, "lm")
    params = None
    weights = "random init (speed does not depend on the weights)"
  model = task.make_model(config)
  if params is None:
    # Unoptimised: the init runs once, and XLA:CPU spends seconds optimising its random draws.
    init = jax.jit(model.init, compiler_options={"xla_backend_optimization_level": 0})
    params = nn.unbox(init(jax.random.key(config.seed), jnp.zeros((1, 1), jnp.int32))["params"])
  params = jax.device_put(params, jax.devices()[0])
  m = config.model
  common = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "host_cpu": host.summary(), "compute_dtype": config.compute_dtype, "params": weights,
            "model": {"width": m.width, "layers": m.num_layers, "heads": m.num_heads,
                      "kv_heads": m.num_kv_heads, "head_dim": m.head_dim, "mlp_hidden": m.mlp_hidden},
            "prompt_len": prompt_len, "new_tokens": new_tokens}
  prefill = jax.jit(functools.partial(sampling.prefill, model, max_len=prompt_len + new_tokens - 1))
  decode = jax.jit(functools.partial(sampling.decode, model, max_new_tokens=new_tokens))
  key = jax.random.key(0)
  rng = np.random.default_rng(0)
  for batch in batches:
    tokens = jnp.asarray(rng.integers(0, model.vocab_size, (batch, prompt_len)), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    logits, cache = jax.block_until_ready(prefill(params, tokens, lengths))  # compiles
    out = jax.block_until_ready(decode(params, cache, logits, lengths, key))  # compiles
    prefill_ms = timing.median_ms(lambda: jax.block_until_ready(prefill(params, tokens, lengths)), runs)
    decode_ms = timing.median_ms(lambda: jax.block_until_ready(decode(params, cache, logits, lengths, key)), runs)
    record = {"benchmark": "lm_decode", **common, "batch": batch,
              "decode_tokens_per_s": timing.figure(new_tokens * batch / decode_ms * 1e3),
              "prefill_ms": timing.figure(prefill_ms), "decode_ms": timing.figure(decode_ms),
              "decode_ms_per_token": timing.figure(decode_ms / new_tokens),
              "statistic": f"median over {runs} calls after a compiling one"}
    if recompute and batch == 1:
      uncached = jax.jit(functools.partial(greedy_uncached, model, new_tokens=new_tokens))
      differ = np.flatnonzero(np.asarray(uncached(params, tokens))[0] != np.asarray(out.tokens)[0])
      recompute_ms = timing.median_ms(lambda: jax.block_until_ready(uncached(params, tokens)), runs)
      record.update(recompute_ms=timing.figure(recompute_ms),
                    recompute_tokens_agree=int(differ[0]) if differ.size else new_tokens,
                    recompute_over_cached=timing.figure(recompute_ms / (prefill_ms + decode_ms)))
    yield record


def main(argv):
  del argv
  args, config = cli.start("configs/lm.py[:variant]", at_least_one=("prompt_len", "new_tokens", "runs"))
  try:
    batches = [int(b) for b in args.batches]
  except ValueError:
    cli.fail("config error", f"batches: must be comma-separated integers, got {','.join(args.batches)}")
  if not batches or min(batches) < 1:
    cli.fail("config error", f"batches: every batch size must be >= 1, got {','.join(args.batches)}")
  from jaxai import checkpointing  # pylint: disable=g-import-not-at-top
  try:
    for record in measure(config, args.workdir, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                          batches=batches, runs=args.runs, recompute=args.recompute):
      print(json.dumps(record), flush=True)
  except config_lib.ConfigError as e:
    cli.fail("config error", str(e))
  except (FileNotFoundError, checkpointing.CheckpointCorrupt) as e:
    cli.fail("checkpoint error", f"{e} (train the LM into --workdir first, or leave --workdir out to "
             "time random parameters)")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
