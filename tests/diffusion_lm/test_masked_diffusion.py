"""The masked diffusion objective against a plain loop over rows and positions, and its masking
rates against the forward process's probabilities."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxai.diffusion_lm import masked_diffusion, tasks


def test_loss_is_the_weighted_cross_entropy_of_a_plain_loop():
  rng = np.random.default_rng(0)
  b, length, vocab = 3, 7, tasks.VOCAB_SIZE
  logits = rng.normal(size=(b, length, vocab)).astype(np.float32)
  tokens = rng.integers(0, 256, (b, length))
  maskable = np.arange(length)[None, :] >= np.array([[2], [3], [0]])
  masked = maskable & (rng.random((b, length)) < 0.5)
  p_mask = np.array([0.3, 0.9, 0.05], np.float32)
  want = 0.0
  for i in range(b):
    row = 0.0
    for j in range(length):
      if masked[i, j]:
        log_p = logits[i, j] - np.log(np.sum(np.exp(logits[i, j].astype(np.float64))))
        row -= log_p[tokens[i, j]] / p_mask[i]
    want += row / maskable[i].sum() / b
  got = masked_diffusion.loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(masked),
                              jnp.asarray(p_mask), jnp.asarray(maskable))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_corruption_masks_only_maskable_positions_at_rate_p():
  rows, length = 4000, 64
  tokens = jnp.tile(jnp.arange(length) % 200, (rows, 1))
  maskable = jnp.broadcast_to(jnp.arange(length) >= 16, (rows, length))
  noisy, masked, p_mask = masked_diffusion.corrupt(tokens, maskable, jax.random.key(3))
  noisy, masked, p_mask, maskable = map(np.asarray, (noisy, masked, p_mask, maskable))
  assert not masked[~maskable].any()
  np.testing.assert_array_equal(noisy[masked], tasks.MASK)
  np.testing.assert_array_equal(noisy[~masked], np.asarray(tokens)[~masked])
  eps = masked_diffusion.MASK_EPS
  assert eps <= p_mask.min() and p_mask.max() <= 1.0
  # t ~ U(0, 1): p is uniform on [eps, 1]; its deciles within sampling error (4000 rows)
  np.testing.assert_allclose(np.quantile(p_mask, np.linspace(0.1, 0.9, 9)),
                             eps + (1 - eps) * np.linspace(0.1, 0.9, 9), atol=0.03)
  # each row's masked share of its 48 maskable positions is binomial(48, p): mean p, and the
  # residual's variance p(1 - p) / 48
  share = masked.sum(-1) / 48
  residual = share - p_mask
  assert abs(residual.mean()) < 0.005
  np.testing.assert_allclose(residual.var(), np.mean(p_mask * (1 - p_mask)) / 48, rtol=0.1)
