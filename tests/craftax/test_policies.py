"""Behaviour policies: the planner's shortest paths, its reading of the game, its skill in the real game."""
import collections
import dataclasses

import numpy as np

from jaxai.craftax import env as craftax_env
from jaxai.craftax import policies


def _bfs_reference(walkable: np.ndarray, goals: np.ndarray) -> np.ndarray:
  """Plain multi-source BFS (unit steps) written independently of the planner."""
  dist = np.full(walkable.shape, np.inf)
  queue = collections.deque()
  for r, c in zip(*np.nonzero(goals & walkable)):
    dist[r, c] = 0
    queue.append((r, c))
  while queue:
    r, c = queue.popleft()
    for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
      if 0 <= nr < walkable.shape[0] and 0 <= nc < walkable.shape[1] and walkable[nr, nc] and \
          dist[nr, nc] == np.inf:
        dist[nr, nc] = dist[r, c] + 1
        queue.append((nr, nc))
  return dist


def test_distance_field_matches_breadth_first_search():
  rng = np.random.default_rng(0)
  walkable = rng.random((64, 64)) > 0.3
  goals = rng.random((64, 64)) > 0.995
  cost = np.where(walkable, 1.0, np.inf)
  field = policies.distance_to_goals(cost, goals)
  # Compared where the player can stand (blocked cells get the distance "as if" standing there).
  np.testing.assert_array_equal(field[walkable], _bfs_reference(walkable, goals)[walkable])


def test_distance_field_charges_for_the_cells_it_enters():
  cost = np.ones((64, 64))
  cost[0, 1] = 2.0  # a block to mine on the way costs two steps
  goals = np.zeros((64, 64), bool)
  goals[0, 2] = True
  field = policies.distance_to_goals(cost, goals)
  assert field[0, 2] == 0 and field[0, 1] == 1
  assert field[0, 0] == 3  # through the block: 2 + 1, cheaper than around it: 1 + 1 + 1 + 1
  assert field[1, 0] == 3  # (1,0) -> (1,1) -> (1,2) -> (0,2)


def _view_on_grass(**overrides) -> craftax_env.SymbolicView:
  """A hand-made game state: the player at (32, 32) on open grass, facing up, nothing in hand."""
  world = np.full((64, 64), policies.GRASS, np.int8)
  fields = dict(map=world, position=np.array([32, 32], np.int32), direction=np.int32(3),
                health=np.int32(9), food=np.int32(9), drink=np.int32(9), energy=np.int32(9),
                is_sleeping=np.bool_(False), inventory=np.zeros(12, np.int32),
                zombies=np.zeros((3, 2), np.int32), zombies_mask=np.zeros(3, bool),
                cows=np.zeros((3, 2), np.int32), cows_mask=np.zeros(3, bool),
                skeletons=np.zeros((2, 2), np.int32), skeletons_mask=np.zeros(2, bool),
                light_level=np.float32(1.0), achievements=np.zeros(22, bool), timestep=np.int32(0))
  fields.update(overrides)
  return craftax_env.SymbolicView(**fields)


def test_expert_turns_to_a_tree_then_chops_it():
  world = np.full((64, 64), policies.GRASS, np.int8)
  world[32, 33] = policies.TREE  # to the right of the player
  planner = policies.make_policy("expert", seed=0)
  planner.skill = dataclasses.replace(planner.skill, epsilon=0.0)
  assert planner.act(_view_on_grass(map=world)) == policies.A.RIGHT.value  # turns (the tree blocks)
  assert planner.act(_view_on_grass(map=world, direction=np.int32(2))) == policies.DO


def test_expert_walks_around_lava_to_the_tree():
  world = np.full((64, 64), policies.GRASS, np.int8)
  world[32, 28] = policies.TREE  # four columns left
  world[31:34, 30] = policies.LAVA  # a lava wall on the straight way
  planner = policies.make_policy("expert", seed=0)
  planner.skill = dataclasses.replace(planner.skill, epsilon=0.0)
  position, direction = np.array([32, 32]), 3
  for _ in range(40):  # the game's movement rule: a move turns, and steps if the cell is free
    action = planner.act(_view_on_grass(map=world, position=position.astype(np.int32),
                                        direction=np.int32(direction)))
    if action == policies.DO:
      break
    assert action in policies.DELTAS
    direction = action
    target = position + policies.DELTAS[action]
    if world[tuple(target)] != policies.TREE:
      position = target
    assert world[tuple(position)] != policies.LAVA
  faced = position + policies.DELTAS[direction]
  assert action == policies.DO and world[tuple(faced)] == policies.TREE


def test_hostile_zombie_next_to_the_player_is_fought():
  planner = policies.make_policy("intermediate", seed=0)
  planner.skill = dataclasses.replace(planner.skill, epsilon=0.0)
  view = _view_on_grass(zombies=np.array([[33, 32], [0, 0], [0, 0]], np.int32),
                        zombies_mask=np.array([True, False, False]), direction=np.int32(4))
  assert planner.act(view) == policies.DO  # facing down, where the zombie is


def test_policies_differ_in_skill_in_the_real_game():
  """A few short episodes in the real game: the expert climbs to stone tools, random does not."""
  names = ("random", "expert")
  specs = [policies.EpisodeSpec(5000 + i, name) for name in names for i in range(3)]
  reached = {name: [] for name in names}
  for summary in policies.play_episodes(specs, num_envs=6, max_episode_len=300, render=False):
    reached[summary.policy].append(summary.achievements)
  index = {name: i for i, name in enumerate(craftax_env.ACHIEVEMENTS)}
  expert = np.stack(reached["expert"])
  random = np.stack(reached["random"])
  assert expert[:, index["make_wood_pickaxe"]].all()
  assert expert[:, index["make_stone_pickaxe"]].sum() >= 2
  assert not random[:, index["make_stone_pickaxe"]].any()
  assert expert.sum() > random.sum()


def test_crafter_score_is_the_geometric_mean_of_one_plus_the_rates():
  assert craftax_env.crafter_score(np.zeros(22)) == 0.0
  assert abs(craftax_env.crafter_score(np.full(22, 100.0)) - 100.0) < 1e-9
  rates = np.array([100.0] + [0.0] * 21)  # one achievement always: (101 * 1**21) ** (1/22) - 1
  assert abs(craftax_env.crafter_score(rates) - (101 ** (1 / 22) - 1)) < 1e-9
