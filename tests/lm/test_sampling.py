"""KV-cached sampling against independent references: the plain model on each unpadded prompt,
numpy's top-k / top-p, and a one-device run for sharded decoding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import INTERPRET_COMPILER_OPTIONS, config_of
from jaxai import config_lib, sharding
from jaxai.lm import model as model_lib
from jaxai.lm import sampling, task

PROMPT_LENGTHS = (5, 1, 9, 3)  # mixed, so rows carry 4, 8, 0 and 6 pad tokens
NEW_TOKENS = 6
NEVER = 300  # not a byte: pads the stop tokens to STOP_SLOTS, so the calls share one program
STOP_SLOTS = 4


def tiny_model(window_tokens=0):
  config = config_of("lm", "tiny")
  config.model.window_tokens = window_tokens
  model = task.make_model(config)
  # Unoptimised (the option the kernel tests use): it runs once, and optimising it costs seconds.
  init = jax.jit(model.init, compiler_options=INTERPRET_COMPILER_OPTIONS)
  params = init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return model, nn.unbox(params)


def generate(model, params, *, stop_tokens=(), seed=0, **options):
  tokens, lengths = sampling.left_pad(prompts())
  stop_tokens = tuple(stop_tokens) + (NEVER,) * (STOP_SLOTS - len(stop_tokens))
  out = sampling.generate(model, params, tokens, lengths, jax.random.key(seed), max_new_tokens=NEW_TOKENS,
                          stop_tokens=stop_tokens, pad_id=0, return_logits=True, **options)
  return jax.tree.map(np.asarray, out)


def plain_logits(model, params, sequences):
  """The plain forward pass (positions 0..n-1, no mask, no cache) of each sequence, as [n, V].
  They run right-padded in one batch: causal attention keeps the trailing pad out of the rest."""
  width = max(len(s) for s in sequences)
  batch = np.array([list(s) + [0] * (width - len(s)) for s in sequences])
  logits = np.asarray(jax.jit(model.apply)({"params": params}, batch))
  return [logits[row, :len(s)] for row, s in enumerate(sequences)]


def prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(0, model_lib.BYTE_VOCAB, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module", name="lm")
def fixture_lm():
  return tiny_model()


@pytest.fixture(scope="module", name="greedy")
def fixture_greedy(lm):
  return generate(*lm)


def numpy_filter(logits, top_k, top_p):
  """Top-k, then the nucleus of the renormalised survivors, row by row in float64."""
  out = np.full(logits.shape, -np.inf)
  for row, values in enumerate(logits.astype(np.float64)):
    order = np.argsort(-values, kind="stable")
    kept = order[:top_k] if top_k > 0 else order
    probs = np.exp(values[kept] - values[kept].max())
    probs /= probs.sum()
    if top_p < 1:
      kept = kept[:int(np.searchsorted(np.cumsum(probs), top_p)) + 1]
    out[row, kept] = values[kept]
  return out


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (300, 1.0), (0, 0.9), (0, 0.05),
                                         (10, 0.5), (3, 0.999)])
def test_filter_logits_matches_numpy(top_k, top_p):
  logits = np.random.default_rng(top_k).normal(0, 3, (5, 256)).astype(np.float32)
  # Traced top_k / top_p: the settings must not be baked into the program.
  got = np.asarray(jax.jit(sampling.filter_logits)(logits, top_k, top_p))
  want = numpy_filter(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(want)])


def test_left_pad():
  tokens, lengths = sampling.left_pad([[1, 2], [3], [4, 5, 6]], pad_id=9, length=4)
  np.testing.assert_array_equal(tokens, [[9, 9, 1, 2], [9, 9, 9, 3], [9, 4, 5, 6]])
  np.testing.assert_array_equal(lengths, [2, 1, 3])
  with pytest.raises(ValueError, match="at least one token"):
    sampling.left_pad([[1], []])


def test_parameters_keep_their_names_and_shapes(lm):
  """Checkpoints and published figures depend on the tree: decoding must not change it."""
  model, params = lm
  w, hidden, heads, kv_heads, d = 64, 128, 8, 4, 16
  block = {"attn/query/kernel": (w, heads, d), "attn/key/kernel": (w, kv_heads, d),
           "attn/value/kernel": (w, kv_heads, d), "attn/out/kernel": (heads, d, w),
           "attn/query_norm/scale": (d,), "attn/key_norm/scale": (d,), "attn_norm/scale": (w,),
           "mlp_norm/scale": (w,), "mlp/gate/kernel": (w, hidden), "mlp/up/kernel": (w, hidden),
           "mlp/down/kernel": (hidden, w)}
  want = {"embed": (256, w), "final_norm/scale": (w,), "head/kernel": (w, 256),
          **{f"block_{i}/{name}": shape for i in range(2) for name, shape in block.items()}}
  got = {"/".join(k.key for k in path): x.shape for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert got == want


@pytest.mark.parametrize("window_tokens", [0, 3])
def test_cached_greedy_decoding_equals_the_plain_model_on_each_unpadded_prompt(window_tokens, lm, greedy):
  if window_tokens:
    lm = tiny_model(window_tokens)
    greedy = generate(*lm)
  np.testing.assert_array_equal(greedy.lengths, NEW_TOKENS)
  assert not np.any(greedy.stopped)
  sequences = [prompt + greedy.tokens[row].tolist() for row, prompt in enumerate(prompts())]
  for row, (prompt, logits) in enumerate(zip(prompts(), plain_logits(*lm, sequences))):
    # The logits each new token was chosen from: after the prompt and the tokens before it.
    want = logits[len(prompt) - 1:-1]
    np.testing.assert_allclose(greedy.logits[row], want, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(greedy.tokens[row], np.argmax(want, axis=-1))


def test_stop_tokens_end_each_row_at_its_first_one(lm, greedy):
  free = greedy.tokens
  stop = int(free[0, 2])
  out = generate(*lm, stop_tokens=(stop,))
  for row in range(len(PROMPT_LENGTHS)):
    hits = np.flatnonzero(free[row] == stop)
    n = int(hits[0]) + 1 if hits.size else NEW_TOKENS
    assert out.lengths[row] == n and out.stopped[row] == bool(hits.size)
    np.testing.assert_array_equal(out.tokens[row, :n], free[row, :n])  # the stop token included
    np.testing.assert_array_equal(out.tokens[row, n:], 0)
  assert out.lengths[0] <= 3 and out.stopped[0]


def test_every_row_stopping_at_once_ends_decoding(lm, greedy):
  out = generate(*lm, stop_tokens=greedy.tokens[:, 0].tolist())
  np.testing.assert_array_equal(out.lengths, 1)
  assert np.all(out.stopped)
  np.testing.assert_array_equal(out.tokens[:, 0], greedy.tokens[:, 0])
  np.testing.assert_array_equal(out.tokens[:, 1:], 0)


def test_sampling_is_reproducible_from_the_key_and_stays_in_the_filtered_set(lm):
  run = lambda seed: generate(*lm, seed=seed, temperature=1.5, top_k=20, top_p=0.8)
  first, again, other = run(0), run(0), run(1)
  np.testing.assert_array_equal(first.tokens, again.tokens)
  assert not np.array_equal(first.tokens, other.tokens)
  for out in (first, other):
    allowed = np.isfinite(numpy_filter(out.logits.reshape(-1, 256) / 1.5, 20, 0.8))
    assert allowed[np.arange(allowed.shape[0]), out.tokens.reshape(-1)].all()


@pytest.mark.parametrize("options", [dict(temperature=1.0, top_k=1), dict(temperature=1e-4),
                                     dict(temperature=1.0, top_p=1e-6)])
def test_sampling_limits_are_greedy(options, lm, greedy):
  """top_k 1, a vanishing temperature (nothing filtered) and a vanishing nucleus each leave only the
  most likely token."""
  np.testing.assert_array_equal(generate(*lm, seed=3, **options).tokens, greedy.tokens)


def test_sharded_decoding_gives_the_one_device_tokens(lm, greedy):
  model, params = lm
  mesh = sharding.make_mesh((1, 2, 4))  # data x fsdp x tensor: batch and embed over 2, heads over 4
  rules = config_lib.DEFAULT_SHARDING_RULES
  tokens, lengths = sampling.left_pad(prompts())
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    placed = jax.device_put(params, sharding.logical_shardings(boxed, mesh, rules))
    out = generate(model, placed)
    _, cache = jax.jit(lambda p: sampling.prefill(model, p, tokens, lengths, max_len=16))(placed)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  np.testing.assert_allclose(out.logits, greedy.logits, atol=1e-5, rtol=0)
  # The cache follows the logical rules: batch over data x fsdp, kv_heads over tensor (its layout
  # is [batch, kv_heads, length, head_dim]).
  want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), "tensor"))
  for name in ("key", "value"):
    assert cache["layers"][-1][name].sharding.is_equivalent_to(want, 4)


def test_a_scanned_model_decodes_what_the_loop_does(lm, greedy):
  """The same weights restacked over layers (``transformer.stack_params``) and the cache stacked
  with them: the same greedy tokens, logits within fp32 rounding."""
  from jaxai.nn import transformer  # pylint: disable=g-import-not-at-top
  model, params = lm
  config = config_of("lm", "tiny")
  config.model.update(scan_layers=True, remat="full")
  scanned = task.make_model(config)
  stacked = transformer.stack_params(params, "block", config.model.num_layers)
  out = generate(scanned, stacked)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  np.testing.assert_allclose(out.logits, greedy.logits, rtol=1e-5, atol=1e-5)
  assert model.num_layers == scanned.num_layers
