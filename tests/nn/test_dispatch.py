"""Kernel dispatch: ``auto`` picks a Pallas kernel only on a platform it is written for, judged by
the mesh being traced for (a TPU slice compiled from this CPU machine included)."""
import importlib.util

import jax
import jax.numpy as jnp
import pytest

from jaxai import sharding
from jaxai.nn import attention, dispatch


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU case")
def test_on_cpu_auto_picks_xla_and_an_explicit_kernel_is_interpreted():
  assert dispatch.target_platform() == "cpu"
  assert dispatch.resolve("auto", ("gpu",)) == "xla"
  assert dispatch.resolve("pallas", ("gpu",)) == "pallas" and dispatch.interpret()
  with pytest.raises(ValueError, match="impl must be one of"):
    dispatch.resolve("triton", ("gpu",))


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu for a TPU topology")
def test_a_step_traced_for_a_tpu_slice_dispatches_as_on_the_tpu():
  from jaxai import dry_run  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh((4, 1, 1), dry_run.topology_devices("v5e:2x2"))
  seen = {}

  def f(q):
    seen["auto"] = dispatch.resolve("auto", ("gpu",))
    seen["tpu"] = dispatch.resolve("auto", ("gpu", "tpu"))
    with pytest.raises(ValueError, match="written for gpu, not tpu"):
      dispatch.resolve("pallas", ("gpu",))
    return attention.dot_product_attention(q, q, q, frame_size=4, impl="auto")

  q = jax.ShapeDtypeStruct((4, 8, 2, 16), jnp.bfloat16)
  with jax.set_mesh(mesh):
    # The block-causal kernel has a TPU dialect: auto picks it, and it compiles for the chips.
    hlo = jax.jit(f).lower(q).compile().as_text()
  assert seen == {"auto": "xla", "tpu": "pallas"}
  assert "tpu_custom_call" in hlo
