"""The LM task's model through both attention implementations."""
import jax
import ml_collections
import numpy as np
from flax import linen as nn

from jaxai.lm import task as lm


def test_language_model_gives_same_loss_and_grads_with_xla_and_pallas_attention():
  """attention_impl only picks the implementation: the Pallas kernel (interpreted on CPU) and the
  XLA path must agree on the model's loss and gradients (full-fp32 matmuls, as the kernel does:
  a GPU's default TF32 would differ in the XLA attention alone)."""
  model_cfg = dict(width=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_hidden=64,
                   qk_norm=True, attn_soft_cap=20.0, logit_soft_cap=0.0, window_tokens=0)
  tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, 256)
  results = []
  for impl in ("xla", "pallas"):
    config = ml_collections.ConfigDict(dict(model=model_cfg, attention_impl=impl, compute_dtype="float32"))
    model = lm.make_model(config)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens[:, :-1])["params"])
    loss_fn = lambda p: lm.next_token_loss(model, p, {"tokens": tokens}, None)[0]  # pylint: disable=cell-var-from-loop
    with jax.default_matmul_precision("highest"):
      results.append(jax.jit(jax.value_and_grad(loss_fn))(params))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
