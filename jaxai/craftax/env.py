"""Craftax-Classic played by many environments at once, with the randomness pinned to a world seed.

Every episode is a pure function of its world seed and its actions, through the package's own API:

    episode_key = jax.random.PRNGKey(world_seed)
    reset_key, steps_key = jax.random.split(episode_key)
    _, state_0 = env.reset(reset_key, params)
    obs, state_t1, reward, done, info = env.step(jax.random.fold_in(steps_key, t), state_t, action_t,
                                                 params)

with ``env = make_env()`` (``Craftax-Classic-Pixels-v1`` without auto-reset) and its default params
(episodes end on death, lava or step 10,000). Frames are the observation as the game renders it,
``round(obs * 255)`` as uint8 [63, 63, 3] (a pixel may differ by 1 between differently compiled
programs, from float rounding). The recorded dataset and its tests rely on this contract.

``ParallelCraftax`` runs ``num_envs`` such episodes in one jitted, vmapped step; each slot can be
restarted with a new world seed on its own, and it hands back numpy ``SymbolicView``s of the state
(map, player, inventory, mobs) for planners that run on the host.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from craftax.craftax_classic import constants as craftax_constants
from craftax.craftax_env import make_craftax_env_from_name

ENV_NAME = "Craftax-Classic-Pixels-v1"
NUM_ACTIONS = len(craftax_constants.Action)  # 17
FRAME_SHAPE = (63, 63, 3)  # (7 map rows + 2 inventory rows) x 9 columns of 7x7-pixel blocks
ACHIEVEMENTS = tuple(a.name.lower() for a in craftax_constants.Achievement)  # 22, in state order
ACTIONS = tuple(a.name.lower() for a in craftax_constants.Action)
MAX_EPISODE_STEPS = 10_000  # the game's own time limit (EnvParams.max_timesteps)

# The inventory fields in the order SymbolicView.inventory stores them.
INVENTORY_ITEMS = ("wood", "stone", "coal", "iron", "diamond", "sapling", "wood_pickaxe",
                   "stone_pickaxe", "iron_pickaxe", "wood_sword", "stone_sword", "iron_sword")


def make_env():
  """The Craftax-Classic pixels environment without auto-reset (resets are the caller's)."""
  return make_craftax_env_from_name(ENV_NAME, auto_reset=False)


def episode_keys(world_seed: int) -> tuple[jax.Array, jax.Array]:
  """(reset_key, steps_key) of the episode played on world ``world_seed``."""
  reset_key, steps_key = jax.random.split(jax.random.PRNGKey(world_seed))
  return reset_key, steps_key


def frame_from_obs(obs: jax.Array) -> jax.Array:
  """The uint8 frame of a [0, 1] float observation, as stored in the dataset."""
  return jnp.round(obs * 255.0).astype(jnp.uint8)


def crafter_score(success_rates_percent: np.ndarray) -> float:
  """Crafter score: geometric mean of (1 + success rate in %) over achievements, minus 1."""
  rates = np.asarray(success_rates_percent, np.float64)
  return float(np.exp(np.mean(np.log1p(rates))) - 1.0)


@dataclasses.dataclass(frozen=True)
class SymbolicView:
  """Numpy copy of what a planner reads from the game state; every field has a leading env axis.

  Map coordinates are (row, column); moving UP decreases the row, LEFT decreases the column.
  """
  map: np.ndarray  # int8 [N, 64, 64] craftax BlockType ids
  position: np.ndarray  # int32 [N, 2]
  direction: np.ndarray  # int32 [N], the move action the player last faced (1..4)
  health: np.ndarray  # int32 [N]
  food: np.ndarray
  drink: np.ndarray
  energy: np.ndarray
  is_sleeping: np.ndarray  # bool [N]
  inventory: np.ndarray  # int32 [N, 12], INVENTORY_ITEMS order
  zombies: np.ndarray  # int32 [N, 3, 2] positions; rows where zombies_mask is False are unused
  zombies_mask: np.ndarray  # bool [N, 3]
  cows: np.ndarray
  cows_mask: np.ndarray
  skeletons: np.ndarray
  skeletons_mask: np.ndarray
  light_level: np.ndarray  # float32 [N], 1 at noon, near 0 at night
  achievements: np.ndarray  # bool [N, 22], ACHIEVEMENTS order
  timestep: np.ndarray  # int32 [N]


def _symbolic_view(state) -> dict[str, jax.Array]:
  inv = state.inventory
  return dict(
      map=state.map.astype(jnp.int8), position=state.player_position.astype(jnp.int32),
      direction=jnp.asarray(state.player_direction, jnp.int32),
      health=jnp.asarray(state.player_health, jnp.int32), food=jnp.asarray(state.player_food, jnp.int32),
      drink=jnp.asarray(state.player_drink, jnp.int32), energy=jnp.asarray(state.player_energy, jnp.int32),
      is_sleeping=jnp.asarray(state.is_sleeping, bool),
      inventory=jnp.stack([jnp.asarray(getattr(inv, k), jnp.int32) for k in INVENTORY_ITEMS], -1),
      zombies=state.zombies.position, zombies_mask=state.zombies.mask,
      cows=state.cows.position, cows_mask=state.cows.mask,
      skeletons=state.skeletons.position, skeletons_mask=state.skeletons.mask,
      light_level=jnp.asarray(state.light_level, jnp.float32),
      achievements=state.achievements, timestep=jnp.asarray(state.timestep, jnp.int32))


@functools.lru_cache(maxsize=None)
def _shared_env():
  return make_env()


def _strong(tree):
  """Drops JAX weak types (reset leaves some), so the jitted step sees one signature."""
  return jax.tree.map(lambda x: jax.lax.convert_element_type(x, jnp.asarray(x).dtype), tree)


def _observe(state, render: bool):
  env = _shared_env()
  frame = frame_from_obs(env.get_obs(state)) if render else jnp.zeros((), jnp.uint8)
  return frame, _symbolic_view(state)


# Module-level jits: every ParallelCraftax of one size shares the (slow, ~20-60 s) compilations.
@functools.partial(jax.jit, static_argnames=("render",))
def _reset_one(world_seed, render: bool):
  env = _shared_env()
  reset_key, steps_key = episode_keys(world_seed)
  _, state = env.reset_env(reset_key, env.default_params)
  state = _strong(state)
  frame, view = _observe(state, render)
  return state, steps_key, frame, view


@functools.partial(jax.jit, static_argnames=("num_envs",))
def _replicate(item, num_envs: int):
  return jax.tree.map(lambda a: jnp.repeat(a[None], num_envs, 0), item)


@functools.partial(jax.jit, donate_argnums=(0,))
def _insert(batch, index, item):
  return jax.tree.map(lambda b, x: b.at[index].set(x), batch, item)


@functools.partial(jax.jit, static_argnames=("render",), donate_argnums=(0,))
def _step_batch(batch, actions, t, render: bool):
  env = _shared_env()

  def one(state, steps_key, action, t):
    _, state, reward, done, _ = env.step_env(jax.random.fold_in(steps_key, t), state, action,
                                             env.default_params)
    frame, view = _observe(state, render)
    return (state, steps_key), reward, done, frame, view
  return jax.vmap(one)(*batch, actions, t)


class ParallelCraftax:
  """``num_envs`` Craftax-Classic episodes stepped together; slots restart independently.

  ``render=False`` skips drawing frames (about twice as fast) for evaluation runs.
  """

  def __init__(self, num_envs: int, *, render: bool = True):
    self.num_envs = num_envs
    self.render = render
    self.t = np.zeros(num_envs, np.int32)  # steps taken in each slot's current episode
    _shared_env()  # built outside any trace: it loads its textures as arrays
    # Until a slot is reset it holds a copy of world 0; callers reset every slot they use.
    state, steps_key, _, _ = _reset_one(jnp.int32(0), render=render)
    self.batch = _replicate((state, steps_key), num_envs=num_envs)

  def reset_slot(self, slot: int, world_seed: int) -> tuple[np.ndarray | None, SymbolicView]:
    """Starts the episode of world ``world_seed`` in ``slot``; returns its first frame and view."""
    state, steps_key, frame, view = _reset_one(jnp.int32(world_seed), render=self.render)
    self.batch = _insert(self.batch, jnp.int32(slot), (state, steps_key))
    self.t[slot] = 0
    frame, view = jax.device_get((frame, view))
    return (frame if self.render else None), SymbolicView(**view)

  def step(self, actions: np.ndarray):
    """Steps every slot; returns (frames [N,63,63,3] | None, rewards, terminals, SymbolicView)."""
    self.batch, rewards, terminals, frames, view = _step_batch(
        # A copy: jnp.asarray may alias the numpy buffer, and the step can run after the in-place
        # increment below (it waits on a pending reset_slot), drawing from the wrong step's key.
        self.batch, jnp.asarray(np.asarray(actions, np.int32)), jnp.asarray(self.t.copy()),
        render=self.render)
    self.t += 1
    rewards, terminals, frames, view = jax.device_get((rewards, terminals, frames, view))
    return (frames if self.render else None), rewards, terminals, SymbolicView(**view)


def slot_view(view: SymbolicView, slot: int) -> SymbolicView:
  """The single-env view of one slot (arrays without the env axis)."""
  return SymbolicView(**{f.name: getattr(view, f.name)[slot] for f in dataclasses.fields(view)})



def _replayed(world_seed, actions, num_steps):
  """(state after ``actions[:num_steps]`` on world ``world_seed``, the episode's steps key); traced."""
  env = _shared_env()
  reset_key, steps_key = episode_keys(world_seed)
  _, state = env.reset_env(reset_key, env.default_params)
  state = _strong(state)

  def replay(t, state):
    _, state, _, _, _ = env.step_env(jax.random.fold_in(steps_key, t), state, actions[t], env.default_params)
    return _strong(state)

  return jax.lax.fori_loop(0, num_steps, replay, state), steps_key


@functools.partial(jax.jit, static_argnames=("num_steps_max",))
def _replay_and_branch(world_seed, actions, num_steps, num_steps_max: int):
  del num_steps_max  # only fixes the padded length of ``actions`` in the compiled program
  env = _shared_env()
  state, steps_key = _replayed(world_seed, actions, num_steps)

  def branch(action):
    _, next_state, _, _, _ = env.step_env(jax.random.fold_in(steps_key, num_steps), state, action,
                                          env.default_params)
    return frame_from_obs(env.get_obs(next_state))

  return frame_from_obs(env.get_obs(state)), jax.vmap(branch)(jnp.arange(NUM_ACTIONS))


@functools.partial(jax.jit, static_argnames=("num_steps_max",))
def _replay_and_continue(world_seed, actions, num_steps, continuation, num_steps_max: int):
  del num_steps_max
  env = _shared_env()
  state, steps_key = _replayed(world_seed, actions, num_steps)

  def step(carry, inputs):
    state, ended = carry
    action, t = inputs
    _, state, reward, done, _ = env.step_env(jax.random.fold_in(steps_key, t), state, action, env.default_params)
    ended = ended | done
    return (_strong(state), ended), (frame_from_obs(env.get_obs(state)), reward, ended, state.achievements)

  times = num_steps + jnp.arange(continuation.shape[0])
  _, (frames, rewards, ended, achievements) = jax.lax.scan(step, (state, jnp.bool_(False)), (continuation, times))
  return frame_from_obs(env.get_obs(state)), frames, rewards, ended, achievements


def _padded_actions(actions: np.ndarray, step: int, max_len: int) -> np.ndarray:
  if not 0 <= step < max_len or step > len(actions):
    raise ValueError(f"step {step} outside the replayable range [0, {min(len(actions), max_len - 1)}]")
  padded = np.zeros(max_len, np.int32)
  padded[:step] = actions[:step]
  return padded


def next_frame_of_every_action(world_seed: int, actions: np.ndarray, step: int,
                               max_len: int = MAX_EPISODE_STEPS) -> tuple[np.ndarray, np.ndarray]:
  """Replays ``actions[:step]`` on world ``world_seed``; returns (frame at ``step`` [63, 63, 3], the
  frames each of the 17 actions leads to from there [17, 63, 63, 3]), all uint8.

  The next step uses the episode's own key for that step, so the branch of the recorded action is
  the recorded next frame, and the others are what the real game would have shown instead.
  """
  frame, branches = _replay_and_branch(jnp.int32(world_seed), jnp.asarray(_padded_actions(actions, step, max_len)),
                                       jnp.int32(step), num_steps_max=max_len)
  return np.asarray(frame), np.asarray(branches)


def continue_episode(world_seed: int, actions: np.ndarray, step: int, continuation: np.ndarray,
                     max_len: int = MAX_EPISODE_STEPS) -> dict[str, np.ndarray]:
  """Replays ``actions[:step]`` on world ``world_seed``, then plays ``continuation`` [H] from there,
  each step with the episode's own key for it (so the recorded actions give the recorded episode).

  Returns ``frame`` (at ``step``, uint8 [63, 63, 3]) and, for the H frames the continuation leads to,
  ``frames`` [H, 63, 63, 3], ``rewards`` float32 [H] (of arriving at each), ``ended`` bool [H] (the
  game is over at that frame or before: what follows is not play) and ``achievements`` bool [H, 22].
  """
  if step + len(continuation) > max_len:
    raise ValueError(f"step {step} + {len(continuation)} continued steps pass the episode limit {max_len}")
  out = _replay_and_continue(jnp.int32(world_seed), jnp.asarray(_padded_actions(actions, step, max_len)),
                             jnp.int32(step), jnp.asarray(np.asarray(continuation, np.int32)),
                             num_steps_max=max_len)
  frame, frames, rewards, ended, achievements = jax.device_get(out)
  return {"frame": frame, "frames": frames, "rewards": rewards.astype(np.float32), "ended": ended,
          "achievements": achievements}
