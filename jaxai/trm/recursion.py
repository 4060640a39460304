"""The three reasoners of one supervision step, as pure functions of the parameters: TRM's
recursion, HRM's two-level recursion with its one-step gradient, and the single pass.

TRM (Jolicoeur-Martineau, 2025) carries an answer y and a latent z. One round updates the latent
``latent_steps`` (n) times from the question, the answer and itself, z <- net(x + y + z), then the
answer from the latent alone, y <- net(y + z) (no x: which network input is which tells the one
network which job it does). A step runs ``rounds`` (T) rounds; the first T - 1 run without
gradient, as a cheap way to improve (y, z) before the round that learns, and the last one is
back-propagated in full. HRM instead back-propagates only through the last f_L and the last f_H
application (its one-step approximation of the fixed point's implicit gradient); the paper finds
that this approximation costs Sudoku-Extreme 87.4% -> 56.5%, which ``one_step_gradient`` on a
TRM config reproduces as an ablation.

"Without gradient" means the parameters and x those rounds read are detached, and so are their
results: the rounds are traced without tangents for the parameters. Loops are
``jax.lax.fori_loop``: a model traces its network a constant number of times, whatever n and T.

Networks are passed as ``net(params, h) -> h`` (``network``), so these functions know nothing of
flax. Each returns the (y, z) to carry, not yet detached: ``supervision`` detaches what it carries.
"""
from typing import Callable

import jax

from jaxai.trm import model as model_lib

Net = Callable[[dict, jax.Array], jax.Array]
no_grad = jax.lax.stop_gradient


def network(model: model_lib.Reasoner, name: str) -> Net:
  """``model``'s network ``name`` (``model.NETWORKS``) as a pure ``(params, h) -> h``."""
  return lambda params, h: model.apply({"params": params}, h, method=lambda m, h: getattr(m, name)(h))


def _repeat(update, count: int, value):
  if count <= 0:
    return value
  if count == 1:
    return update(value)
  return jax.lax.fori_loop(0, count, lambda _, v: update(v), value)


def _without_gradient(update, count: int, value):
  """``update`` applied ``count`` times, its result detached; ``value`` as it is for count 0 (a
  carry is detached where it is carried, not here)."""
  return value if count <= 0 else no_grad(_repeat(update, count, value))


def trm_recursion(net: Net, params, x, y, z, *, rounds: int, latent_steps: int,
                  one_step_gradient: bool = False):
  """One TRM supervision step from (y, z) -> (y, z): ``rounds`` rounds of ``latent_steps`` latent
  updates and one answer update, all but the last round without gradient (with
  ``one_step_gradient``: all but the last latent and the last answer update)."""
  def latent(params, x, y, z):
    return net(params, x + y + z)

  def one_round(params, x, y, z):
    z = _repeat(lambda z: latent(params, x, y, z), latent_steps, z)
    return net(params, y + z), z

  frozen_params, frozen_x = no_grad(params), no_grad(x)
  y, z = _without_gradient(lambda yz: one_round(frozen_params, frozen_x, *yz), rounds - 1, (y, z))
  if not one_step_gradient:
    return one_round(params, x, y, z)
  z = _without_gradient(lambda z: latent(frozen_params, frozen_x, y, z), latent_steps - 1, z)
  z = latent(params, x, y, z)
  return net(params, y + z), z


def hrm_recursion(low_net: Net, high_net: Net, params, x, z_high, z_low, *, high_cycles: int,
                  low_steps: int):
  """One HRM step from (z_H, z_L) -> (z_H, z_L): ``high_cycles`` cycles of ``low_steps``
  z_L <- f_L(z_L + z_H + x) and one z_H <- f_H(z_H + z_L); only the last f_L and the last f_H
  application carry gradient."""
  def low(params, x, z_high, z_low):
    return low_net(params, z_low + z_high + x)

  def cycle(params, x, z_high, z_low):
    z_low = _repeat(lambda z: low(params, x, z_high, z), low_steps, z_low)
    return high_net(params, z_high + z_low), z_low

  frozen_params, frozen_x = no_grad(params), no_grad(x)
  z_high, z_low = _without_gradient(lambda zs: cycle(frozen_params, frozen_x, *zs), high_cycles - 1,
                                    (z_high, z_low))
  z_low = _without_gradient(lambda z: low(frozen_params, frozen_x, z_high, z), low_steps - 1, z_low)
  z_low = low(params, x, z_high, z_low)
  return high_net(params, z_high + z_low), z_low


def reason(model: model_lib.Reasoner, params, x, y, z):
  """The model's reasoner on x from the carried (y, z) -> (y, z); y is what the heads read (TRM's
  answer, HRM's z_H). The single pass ignores (y, z) and returns (net(x), z)."""
  c = model.config
  if c.reasoner == "trm":
    return trm_recursion(network(model, "net"), params, x, y, z, rounds=c.rounds,
                         latent_steps=c.latent_steps, one_step_gradient=c.one_step_gradient)
  if c.reasoner == "hrm":
    return hrm_recursion(network(model, "low_net"), network(model, "high_net"), params, x, y, z,
                         high_cycles=c.rounds, low_steps=c.latent_steps)
  return network(model, "net")(params, x), z
