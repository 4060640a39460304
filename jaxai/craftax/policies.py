"""Behaviour policies of mixed skill for Craftax-Classic, and the loop that plays them.

How they were obtained: no learning. ``Planner`` is a hand-written, rule-based planner that reads
the symbolic game state (the whole 64x64 map, the player's position, facing direction, inventory and
vital stats, the mobs) - an omniscient player, unlike a human who sees 9x7 blocks. It climbs the
crafting ladder with shortest paths (Dijkstra on the map; mining through stone, coal, iron, trees
counts as 2 steps once the tool allows it, lava and its neighbourhood are avoided):

  wood -> table -> wood pickaxe, wood sword -> sapling, plant -> stone -> place stone -> stone
  pickaxe, stone sword -> furnace (beside a table) -> coal, iron -> iron pickaxe, iron sword
  (standing next to a table and a furnace, building fresh ones when the old are far) -> diamond

and in between it drinks water, hunts cows and eats ripe plants when thirsty or hungry, fights
adjacent zombies and skeletons, and sleeps when tired or at night: a skilled player first digs a
two-block tunnel into stone and walls it off behind itself, so that zombies cannot reach it.

Skill levels (``SKILLS``) are that planner with a ceiling on how far up the ladder it goes and
"distractions": with probability ``epsilon`` per step it starts 1-4 steps of uniformly random
actions (never a walk into lava), the way a human player fumbles or looks around. ``random`` is
uniform random actions. Their achievement success rates, measured in the real environment with
``python -m jaxai.craftax.evaluate_policies``, are in that module's docstring (Crafter scores:
random 1.8, novice 10.5, intermediate 42.5, expert 98.9; only the expert makes iron tools and
mines diamonds, in ~97% of its 2000-step episodes).

``play_episodes`` runs a list of (world seed, policy) episodes on ``ParallelCraftax`` and yields
fixed-length chunks of recorded steps and per-episode summaries; the dataset builder and the
evaluation use it. Step ``t`` of a recorded episode holds ``frame_t``, the ``action_t`` chosen on
seeing it (NOOP on the last step, which has no successor), ``reward_t`` received on arriving at
``frame_t`` (0 on the first step), ``is_first_t``, ``is_last_t``, ``is_terminal_t`` (the game
ended: death, lava, or its 10,000-step limit; ``is_last`` without ``is_terminal`` means the episode
was truncated at ``max_episode_len``), and the achievements unlocked so far.
"""
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
from craftax.craftax_classic.constants import Achievement, Action, BlockType
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from jaxai.craftax import env as craftax_env


@dataclasses.dataclass(frozen=True)
class Skill:
  """A behaviour policy: the planner with a ladder ceiling and random distractions."""
  name: str
  epsilon: float  # chance per step of starting a 1-4 step burst of random actions
  max_tier: int  # 0: no crafting, 1: wood tools, 2: + stone tools, furnace, 3: + iron tools, 4: + diamond
  shelter: bool  # digs in and walls itself off before sleeping (else sleeps wherever it is)
  drink_at: int  # goes to drink when drink <= this (0: only when dying of thirst)
  eat_at: int
  sleep_at: int  # goes to sleep when energy <= this
  sleeps_at_night: bool  # takes cover (and sleeps) through the dark, when zombies swarm
  cover_at: int  # takes cover when health <= this, until it heals


SKILLS = {
    "random": None,  # uniform random actions
    "novice": Skill("novice", epsilon=0.35, max_tier=1, shelter=False, drink_at=2, eat_at=2,
                    sleep_at=1, sleeps_at_night=False, cover_at=0),
    "intermediate": Skill("intermediate", epsilon=0.15, max_tier=2, shelter=True, drink_at=4,
                          eat_at=4, sleep_at=2, sleeps_at_night=True, cover_at=2),
    "expert": Skill("expert", epsilon=0.03, max_tier=4, shelter=True, drink_at=5, eat_at=5,
                    sleep_at=3, sleeps_at_night=True, cover_at=4),
}
POLICY_NAMES = tuple(SKILLS)

# --- game facts the planner uses (from craftax.craftax_classic.game_logic) --------------------------
B = BlockType
GRASS, WATER, STONE, TREE, PATH, COAL, IRON, DIAMOND = (B.GRASS.value, B.WATER.value, B.STONE.value,
                                                       B.TREE.value, B.PATH.value, B.COAL.value,
                                                       B.IRON.value, B.DIAMOND.value)
TABLE, FURNACE, SAND, LAVA, RIPE_PLANT = (B.CRAFTING_TABLE.value, B.FURNACE.value, B.SAND.value,
                                          B.LAVA.value, B.RIPE_PLANT.value)
A = Action
NOOP, DO, SLEEP = A.NOOP.value, A.DO.value, A.SLEEP.value
MOVES = (A.LEFT.value, A.RIGHT.value, A.UP.value, A.DOWN.value)
DELTAS = {A.LEFT.value: (0, -1), A.RIGHT.value: (0, 1), A.UP.value: (-1, 0), A.DOWN.value: (1, 0)}
OPPOSITE = {A.LEFT.value: A.RIGHT.value, A.RIGHT.value: A.LEFT.value, A.UP.value: A.DOWN.value,
            A.DOWN.value: A.UP.value}
WALKABLE = np.zeros(32, bool)
WALKABLE[[GRASS, SAND, PATH]] = True  # lava is walkable too, and kills: never walk there
INV = {name: i for i, name in enumerate(craftax_env.INVENTORY_ITEMS)}
ACH = {a.name.lower(): a.value for a in Achievement}

MAP_SIZE = 64
STATION_REACH = 15  # walk back to a table (and furnace) this close; build a new one if farther


@dataclasses.dataclass(frozen=True)
class Recipe:
  item: str
  action: int
  tier: int
  wood: int
  stone: int = 0
  coal: int = 0
  iron: int = 0
  furnace: bool = False  # also needs a furnace nearby (every recipe needs a table)


RECIPES = (Recipe("wood_pickaxe", A.MAKE_WOOD_PICKAXE.value, 1, wood=1),
           Recipe("wood_sword", A.MAKE_WOOD_SWORD.value, 1, wood=1),
           Recipe("stone_pickaxe", A.MAKE_STONE_PICKAXE.value, 2, wood=1, stone=1),
           Recipe("stone_sword", A.MAKE_STONE_SWORD.value, 2, wood=1, stone=1),
           Recipe("iron_pickaxe", A.MAKE_IRON_PICKAXE.value, 3, wood=1, stone=1, coal=1, iron=1,
                  furnace=True),
           Recipe("iron_sword", A.MAKE_IRON_SWORD.value, 3, wood=1, stone=1, coal=1, iron=1,
                  furnace=True))
_IDX = np.arange(MAP_SIZE * MAP_SIZE).reshape(MAP_SIZE, MAP_SIZE)


def _neighbour_pairs():
  src, dst = [], []
  for dr, dc in DELTAS.values():
    rows = slice(max(0, -dr), MAP_SIZE - max(0, dr))
    cols = slice(max(0, -dc), MAP_SIZE - max(0, dc))
    rows_n = slice(max(0, dr), MAP_SIZE - max(0, -dr))
    cols_n = slice(max(0, dc), MAP_SIZE - max(0, -dc))
    src.append(_IDX[rows, cols].ravel())
    dst.append(_IDX[rows_n, cols_n].ravel())
  return np.concatenate(src), np.concatenate(dst)


_SRC, _DST = _neighbour_pairs()  # every (cell, 4-neighbour) pair of the map


def _shift(mask: np.ndarray, dr: int, dc: int) -> np.ndarray:
  """out[r, c] = mask[r + dr, c + dc], False outside the map."""
  out = np.zeros_like(mask)
  h, w = mask.shape
  out[max(0, -dr):h - max(0, dr), max(0, -dc):w - max(0, dc)] = \
      mask[max(0, dr):h - max(0, -dr), max(0, dc):w - max(0, -dc)]
  return out


def _adjacent4(mask: np.ndarray) -> np.ndarray:
  return _shift(mask, 0, 1) | _shift(mask, 0, -1) | _shift(mask, 1, 0) | _shift(mask, -1, 0)


def _adjacent8(mask: np.ndarray) -> np.ndarray:
  out = _adjacent4(mask)
  for dr in (-1, 1):
    for dc in (-1, 1):
      out |= _shift(mask, dr, dc)
  return out


def distance_to_goals(enter_cost: np.ndarray, goals: np.ndarray, limit: float = np.inf) -> np.ndarray:
  """Cost of the cheapest walk from every cell to any goal cell; entering cell v costs enter_cost[v].

  Dijkstra from the goals on the reversed grid graph. Cells that cannot reach a goal get inf.
  """
  cost = enter_cost.ravel()
  weights = cost[_DST]
  ok = np.isfinite(weights)
  # The forward edge u -> v costs cost[v]; reversed, it leaves v towards u with the same weight.
  graph = csr_matrix((weights[ok], (_DST[ok], _SRC[ok])), shape=(cost.size, cost.size))
  sources = np.flatnonzero(goals.ravel() & np.isfinite(cost))
  if sources.size == 0:
    return np.full(enter_cost.shape, np.inf)
  dist = dijkstra(graph, directed=True, indices=sources, min_only=True, limit=limit)
  return dist.reshape(enter_cost.shape)


class RandomPolicy:
  """Uniformly random actions: the aimless player."""
  name = "random"

  def __init__(self, seed: int):
    self.rng = np.random.default_rng(seed)

  def act(self, view: craftax_env.SymbolicView) -> int:
    del view
    return int(self.rng.integers(craftax_env.NUM_ACTIONS))


class Planner:
  """The rule-based planner of one episode (see the module docstring); ``act`` picks one action."""

  def __init__(self, skill: Skill, seed: int):
    self.skill = skill
    self.name = skill.name
    self.rng = np.random.default_rng(seed)
    self.noise_left = 0
    self.noise_action = NOOP
    self.drinking = self.eating = self.sleeping = False
    self.gathering: dict[str, int] = {}  # resource -> count to gather up to (hysteresis)
    self.script: list[tuple[tuple[int, int], int]] = []  # (expected position, action) macro
    self.waypoint = None
    self.waypoint_steps = 0
    self._cache_map = None
    self._cache_tools = None
    self._cost = None
    self._fields: dict = {}

  # -- entry point ---------------------------------------------------------------------------------
  def act(self, v: craftax_env.SymbolicView) -> int:
    if v.is_sleeping:
      return NOOP  # the game ignores actions while asleep
    if self.noise_left > 0 or self.rng.random() < self.skill.epsilon:
      if self.noise_left == 0:
        self.noise_left = int(self.rng.integers(1, 5))
        self.noise_action = self._random_action()
        self.script = []
      self.noise_left -= 1
      action = self.noise_action if self.rng.random() < 0.5 else self._random_action()
      return self._not_into_lava(v, action)
    return self._plan(v)

  def _random_action(self) -> int:
    action = SLEEP
    while action == SLEEP:  # players do not doze off by accident (and it is often fatal)
      action = int(self.rng.integers(craftax_env.NUM_ACTIONS))
    return action

  def _not_into_lava(self, v, action: int) -> int:
    if action in DELTAS:
      r, c = v.position[0] + DELTAS[action][0], v.position[1] + DELTAS[action][1]
      if 0 <= r < MAP_SIZE and 0 <= c < MAP_SIZE and v.map[r, c] == LAVA:
        return NOOP
    return action

  # -- what to do now --------------------------------------------------------------------------------
  def _plan(self, v) -> int:
    sk = self.skill
    self._sync(v)
    fight = self._adjacent_enemy(v)
    if fight is not None:
      self.script = []
      return self._face_and(v, fight, DO)
    if self.script:
      action = self._follow_script(v)
      if action is not None:
        return action
    # Vital needs first, each kept until satisfied (hysteresis), as a human would.
    night = sk.sleeps_at_night and v.light_level < 0.5
    if v.energy >= 9 and not night and v.health > sk.cover_at + 2:
      self.sleeping = False
    if v.energy <= sk.sleep_at or night or v.health <= sk.cover_at:
      self.sleeping = True
    if v.drink <= sk.drink_at or (self.drinking and v.drink < 9):
      self.drinking = True
      action = self._collect(v, "drink", WATER)
      if action is not None:
        return action
    self.drinking = False
    if v.food <= sk.eat_at or (self.eating and v.food < 7):
      self.eating = True
      action = self._eat(v)
      if action is not None:
        return action
    self.eating = False
    if self.sleeping:
      action = self._sleep(v)
      if action is not None:
        return action
    action = self._ladder(v)
    if action is not None:
      return action
    return self._free_play(v)

  def _ladder(self, v):
    """The crafting ladder up to the skill's ceiling; None when it has nothing left to do."""
    tier, inv, ach = self.skill.max_tier, v.inventory, v.achievements
    todo = [r for r in RECIPES if r.tier <= tier and not inv[INV[r.item]]]
    furnace_wanted = tier >= 2 and not ach[ACH["place_furnace"]]
    if not todo and not furnace_wanted:
      if tier >= 4 and not ach[ACH["collect_diamond"]]:
        return self._collect(v, "diamond", DIAMOND) or self._explore(v)
      return None
    # Side goals that players pick up on the way: a sapling and its plant, a placed stone.
    if inv[INV["wood_pickaxe"]] and not ach[ACH["collect_sapling"]] and not inv[INV["sapling"]]:
      return self._collect_sapling(v)
    if inv[INV["sapling"]] and not ach[ACH["place_plant"]]:
      return self._place_on_grass(v, A.PLACE_PLANT.value)
    if tier >= 2 and inv[INV["stone"]] > 1 and not ach[ACH["place_stone"]]:
      return self._place(v, A.PLACE_STONE.value, allow_water=True)

    # The next craft and its station; the furnace is placed after the stone tools, by a table.
    recipe = todo[0] if todo else None
    uses_furnace = recipe is None or recipe.furnace
    table_far = self._station_distance(v, need_furnace=False) > STATION_REACH
    furnace_far = uses_furnace and self._station_distance(v, need_furnace=True) > STATION_REACH
    need = dict(wood=2 * table_far, stone=int(furnace_far), coal=0, iron=0)
    if recipe is not None:
      for resource in need:
        need[resource] += getattr(recipe, resource)
    # Gather in batches (everything the remaining ladder needs), as players do.
    batch = dict(wood=sum(r.wood for r in todo) + 2 * table_far,
                 stone=sum(r.stone for r in todo) + furnace_wanted + 2,
                 coal=sum(r.coal for r in todo), iron=sum(r.iron for r in todo))
    for resource, block in (("wood", TREE), ("stone", STONE), ("coal", COAL), ("iron", IRON)):
      count = inv[INV[resource]]
      if count < need[resource] or count < self.gathering.get(resource, 0):
        self.gathering[resource] = min(9, max(batch[resource], need[resource]))
        step = self._collect(v, resource, block)
        return step if step is not None else self._explore(v)
      self.gathering.pop(resource, None)

    if table_far:
      return self._place(v, A.PLACE_TABLE.value)
    if furnace_far:
      return self._place_furnace(v)
    if recipe is None:
      return None
    return self._craft(v, recipe.action, need_furnace=recipe.furnace)

  def _free_play(self, v):
    """After the ladder: keep a plant, eat it when ripe, wander."""
    if v.food < 9 and self._reachable(v, "ripe_plant", v.map == RIPE_PLANT, 30):
      return self._collect(v, "ripe_plant", RIPE_PLANT)
    if not v.achievements[ACH["place_plant"]] and v.inventory[INV["sapling"]] == 0:
      return self._collect_sapling(v) or self._explore(v)
    if v.inventory[INV["sapling"]] > 0:
      return self._place_on_grass(v, A.PLACE_PLANT.value) or self._explore(v)
    return self._explore(v)

  # -- movement ------------------------------------------------------------------------------------
  def _enter_cost(self, v) -> np.ndarray:
    inv = v.inventory
    m = v.map
    cost = np.where(WALKABLE[m], 1.0, np.inf)
    cost[m == TREE] = 2.0  # chop through (the tree becomes grass)
    if inv[INV["wood_pickaxe"]]:
      cost[(m == STONE) | (m == COAL)] = 2.0
      if inv[INV["stone"]] >= 2:
        cost[m == WATER] = 3.0  # bridge: place a stone, mine it, step on the path
    if inv[INV["stone_pickaxe"]]:
      cost[m == IRON] = 2.0
    if inv[INV["iron_pickaxe"]]:
      cost[m == DIAMOND] = 2.0
    cost[_adjacent8(m == LAVA)] += 4.0  # keep a berth: one random step there is death
    cost[m == LAVA] = np.inf
    return cost

  def _sync(self, v):
    """Drops the cached distance fields when the map or what can be mined changes."""
    tools = (tuple(v.inventory[6:9]), v.inventory[INV["stone"]] >= 2)
    if tools != self._cache_tools or not np.array_equal(v.map, self._cache_map):
      self._cache_map = v.map.copy()
      self._cache_tools = tools
      self._cost = self._enter_cost(v)
      self._fields = {}

  def _field_for(self, key, goals_fn) -> np.ndarray:
    """Distance-to-goal field of ``goals_fn()`` cells, cached until the map changes."""
    field = self._fields.get(key)
    if field is None:
      if len(self._fields) >= 12:
        self._fields.pop(next(iter(self._fields)))
      field = self._fields[key] = distance_to_goals(self._cost, goals_fn())
    return field

  def _go(self, v, field: np.ndarray):
    """One step down the field towards its goal; None if already there or unreachable."""
    r, c = int(v.position[0]), int(v.position[1])
    here = field[r, c]
    if not np.isfinite(here) or here == 0:
      return None
    cost = self._cost
    best, options = np.inf, []
    for move, (dr, dc) in DELTAS.items():
      nr, nc = r + dr, c + dc
      if 0 <= nr < MAP_SIZE and 0 <= nc < MAP_SIZE:
        value = cost[nr, nc] + field[nr, nc]
        if not np.isfinite(value):
          continue
        if value < best - 1e-9:
          best, options = value, [move]
        elif abs(value - best) < 1e-9:
          options.append(move)
    if not options or not np.isfinite(best):
      return None
    move = options[int(self.rng.integers(len(options)))] if len(options) > 1 else options[0]
    nr, nc = r + DELTAS[move][0], c + DELTAS[move][1]
    block = v.map[nr, nc]
    if WALKABLE[block] and not self._mob_at(v, nr, nc):
      return move
    if block == WATER:
      return self._face_and(v, move, A.PLACE_STONE.value)
    return self._face_and(v, move, DO)  # mine the block, or hit the mob, in the way

  def _face_and(self, v, move: int, action: int) -> int:
    """Faces the neighbour in direction ``move`` (turning costs a step) and then does ``action``."""
    return action if int(v.direction) == move else move

  def _mob_at(self, v, r, c) -> bool:
    for pos, mask in ((v.zombies, v.zombies_mask), (v.cows, v.cows_mask),
                      (v.skeletons, v.skeletons_mask)):
      for i in range(mask.shape[0]):
        if mask[i] and pos[i, 0] == r and pos[i, 1] == c:
          return True
    return False

  def _adjacent_enemy(self, v):
    r, c = int(v.position[0]), int(v.position[1])
    for pos, mask in ((v.zombies, v.zombies_mask), (v.skeletons, v.skeletons_mask)):
      for i in range(mask.shape[0]):
        if mask[i]:
          dr, dc = int(pos[i, 0]) - r, int(pos[i, 1]) - c
          for move, delta in DELTAS.items():
            if delta == (dr, dc):
              return move
    return None

  def _explore(self, v):
    """Walks to random waypoints: what a player does with nothing in sight."""
    r, c = int(v.position[0]), int(v.position[1])
    self.waypoint_steps -= 1
    if self.waypoint is None or self.waypoint == (r, c) or self.waypoint_steps <= 0:
      walkable = WALKABLE[v.map]
      rows, cols = np.nonzero(walkable)
      far = (np.abs(rows - r) + np.abs(cols - c) >= 6) & (np.abs(rows - r) + np.abs(cols - c) <= 20)
      if far.any():
        k = int(self.rng.choice(np.flatnonzero(far)))
        self.waypoint = (int(rows[k]), int(cols[k]))
      else:
        self.waypoint = None
      self.waypoint_steps = 40
    if self.waypoint is not None:
      def goals(point=self.waypoint):
        mask = np.zeros_like(v.map, bool)
        mask[point] = True
        return mask
      action = self._go(v, self._field_for(("waypoint", self.waypoint), goals))
      if action is not None:
        return action
      self.waypoint = None
    return self._not_into_lava(v, MOVES[int(self.rng.integers(4))])

  # -- tasks ---------------------------------------------------------------------------------------
  def _collect(self, v, name: str, block: int):
    """Walks next to the nearest ``block`` and hits it; None when none is reachable."""
    target = v.map == block
    field = self._field_for(name, lambda: _adjacent4(target))
    r, c = int(v.position[0]), int(v.position[1])
    if field[r, c] == 0:
      for move, (dr, dc) in DELTAS.items():
        nr, nc = r + dr, c + dc
        if 0 <= nr < MAP_SIZE and 0 <= nc < MAP_SIZE and target[nr, nc]:
          return self._face_and(v, move, DO)
    return self._go(v, field)

  def _reachable(self, v, name, target, max_cost) -> bool:
    field = self._field_for(name, lambda: _adjacent4(target))
    return field[int(v.position[0]), int(v.position[1])] <= max_cost

  def _eat(self, v):
    """Hunts the nearest cow, or eats a ripe plant."""
    if (v.map == RIPE_PLANT).any():
      action = self._collect(v, "ripe_plant", RIPE_PLANT)
      if action is not None:
        return action
    cows = np.zeros_like(v.map, bool)
    for i in range(v.cows_mask.shape[0]):
      if v.cows_mask[i]:
        cows[v.cows[i, 0], v.cows[i, 1]] = True
    if not cows.any():
      return self._explore(v)  # cows spawn on grass near the player
    r, c = int(v.position[0]), int(v.position[1])
    for move, (dr, dc) in DELTAS.items():
      nr, nc = r + dr, c + dc
      if 0 <= nr < MAP_SIZE and 0 <= nc < MAP_SIZE and cows[nr, nc]:
        return self._face_and(v, move, DO)
    key = ("cows", tuple(map(tuple, np.argwhere(cows))))
    action = self._go(v, self._field_for(key, lambda: _adjacent4(cows)))
    return action if action is not None else self._explore(v)

  def _collect_sapling(self, v):
    """Hits grass until a sapling drops (10% per hit)."""
    r, c = int(v.position[0]), int(v.position[1])
    dr, dc = DELTAS.get(int(v.direction), (0, 0))
    fr, fc = r + dr, c + dc
    if 0 <= fr < MAP_SIZE and 0 <= fc < MAP_SIZE and v.map[fr, fc] == GRASS and \
        not self._mob_at(v, fr, fc):
      return DO
    grass_moves = [m for m, (dr, dc) in DELTAS.items()
                   if 0 <= r + dr < MAP_SIZE and 0 <= c + dc < MAP_SIZE and v.map[r + dr, c + dc] == GRASS]
    if grass_moves:
      return grass_moves[int(self.rng.integers(len(grass_moves)))]
    field = self._field_for("grass", lambda: v.map == GRASS)
    return self._go(v, field)

  def _place_on_grass(self, v, action: int):
    r, c = int(v.position[0]), int(v.position[1])
    dr, dc = DELTAS.get(int(v.direction), (0, 0))
    fr, fc = r + dr, c + dc
    if 0 <= fr < MAP_SIZE and 0 <= fc < MAP_SIZE and v.map[fr, fc] == GRASS and \
        not self._mob_at(v, fr, fc):
      return action
    return self._step_to_face(v, lambda b: b == GRASS)

  def _step_to_face(self, v, ok, keep_near=None):
    """Moves so that the next faced cell satisfies ``ok`` (a cell can be faced only by walking
    towards it, so this walks one cell in a direction whose next-but-one cell is ``ok``)."""
    r, c = int(v.position[0]), int(v.position[1])
    good, fallback = [], []
    for move, (dr, dc) in DELTAS.items():
      nr, nc = r + dr, c + dc
      if not (0 <= nr < MAP_SIZE and 0 <= nc < MAP_SIZE) or not WALKABLE[v.map[nr, nc]]:
        continue
      if keep_near is not None and not keep_near[nr, nc]:
        continue
      fr, fc = nr + dr, nc + dc
      if 0 <= fr < MAP_SIZE and 0 <= fc < MAP_SIZE and ok(v.map[fr, fc]):
        good.append(move)
      else:
        fallback.append(move)
    options = good or fallback
    if not options:
      return self._explore(v)
    return options[int(self.rng.integers(len(options)))]

  def _place(self, v, action: int, allow_water: bool = False):
    """Places a table/stone/furnace on the faced cell if it is free, else turns to a free one."""
    r, c = int(v.position[0]), int(v.position[1])
    dr, dc = DELTAS.get(int(v.direction), (0, 0))
    fr, fc = r + dr, c + dc
    def free(block):
      return WALKABLE[block] or (allow_water and block == WATER)
    if 0 <= fr < MAP_SIZE and 0 <= fc < MAP_SIZE and free(v.map[fr, fc]) and \
        not self._mob_at(v, fr, fc):
      return action
    return self._step_to_face(v, free)

  def _station_distance(self, v, need_furnace: bool) -> float:
    field = self._station_field(v, need_furnace)
    return field[int(v.position[0]), int(v.position[1])]

  def _station_field(self, v, need_furnace: bool):
    def goals():
      near = _adjacent8(v.map == TABLE) & WALKABLE[v.map]
      return near & _adjacent8(v.map == FURNACE) if need_furnace else near
    return self._field_for(("station", need_furnace), goals)

  def _craft(self, v, action: int, need_furnace: bool):
    field = self._station_field(v, need_furnace)
    if field[int(v.position[0]), int(v.position[1])] == 0:
      return action
    step = self._go(v, field)
    return step if step is not None else self._explore(v)

  def _place_furnace(self, v):
    """Stands next to a table and places the furnace on a free faced cell."""
    near_table = _adjacent8(v.map == TABLE) & WALKABLE[v.map]
    r, c = int(v.position[0]), int(v.position[1])
    if not near_table[r, c]:
      step = self._go(v, self._field_for("table", lambda: near_table))
      return step if step is not None else self._place(v, A.PLACE_TABLE.value)
    dr, dc = DELTAS.get(int(v.direction), (0, 0))
    fr, fc = r + dr, c + dc
    if 0 <= fr < MAP_SIZE and 0 <= fc < MAP_SIZE and WALKABLE[v.map[fr, fc]] and \
        not self._mob_at(v, fr, fc):
      return A.PLACE_FURNACE.value
    return self._step_to_face(v, lambda b: WALKABLE[b], keep_near=near_table)

  # -- sleeping ------------------------------------------------------------------------------------
  def _sealed(self, v, also_blocked=None) -> bool:
    """True when at most 3 open cells connect to the player (with ``also_blocked`` walled up):
    no zombie can walk in, and none spawns that close."""
    r, c = int(v.position[0]), int(v.position[1])
    seen = {(r, c)}
    frontier = [(r, c)]
    while frontier:
      cr, cc = frontier.pop()
      for dr, dc in DELTAS.values():
        nr, nc = cr + dr, cc + dc
        if 0 <= nr < MAP_SIZE and 0 <= nc < MAP_SIZE and (nr, nc) not in seen and \
            (nr, nc) != also_blocked and (WALKABLE[v.map[nr, nc]] or v.map[nr, nc] == LAVA):
          seen.add((nr, nc))
          frontier.append((nr, nc))
          if len(seen) > 3:
            return False
    return True

  def _sleep(self, v):
    """Rests: sleeps when tired, else waits; a skilled player first walls itself in."""
    if not self.skill.shelter:
      return SLEEP if v.energy <= self.skill.sleep_at else None
    if self._sealed(v):
      return SLEEP if v.energy < 9 else NOOP
    r, c = int(v.position[0]), int(v.position[1])
    dr, dc = DELTAS.get(int(v.direction), (0, 0))
    faced = (r + dr, c + dc)
    if v.inventory[INV["stone"]] > 0 and 0 <= faced[0] < MAP_SIZE and 0 <= faced[1] < MAP_SIZE and \
        WALKABLE[v.map[faced]] and self._sealed(v, also_blocked=faced):
      # One stone in front closes the pocket (a cow in the way is hit until it is gone).
      return DO if self._mob_at(v, *faced) else A.PLACE_STONE.value
    action = self._dig_in(v) if v.inventory[INV["wood_pickaxe"]] else None
    if action is None and v.energy <= 1:
      return SLEEP  # no shelter to be had: sleep in the open only when spent
    return action

  def _dig_in(self, v):
    # Dig a 2-deep tunnel into solid stone, step back and wall up the entrance behind.
    m = v.map
    solid_around = ~(WALKABLE[m] | (m == LAVA))
    sites = np.zeros(m.shape, bool)
    site_move = {}
    for move, (dr, dc) in DELTAS.items():
      pr, pc = (dc, dr), (-dc, -dr)  # the two perpendicular offsets
      ok = WALKABLE[m] & _shift(m == STONE, dr, dc) & _shift(m == STONE, 2 * dr, 2 * dc)
      ok &= _shift(solid_around, 3 * dr, 3 * dc)
      for k in (1, 2):
        for p in (pr, pc):
          ok &= _shift(solid_around, k * dr + p[0], k * dc + p[1])
      for cell in np.argwhere(ok & ~sites):
        site_move[tuple(cell)] = move
      sites |= ok
    if not sites.any():
      return None
    r, c = int(v.position[0]), int(v.position[1])
    field = self._field_for("shelter", lambda: sites)
    if field[r, c] == 0 and (r, c) in site_move:
      move = site_move[(r, c)]
      dr, dc = DELTAS[move]
      one, two = (r + dr, c + dc), (r + 2 * dr, c + 2 * dc)
      # Then _sleep sees the pocket sealed (or, if a mob blocked the stone, goes on walling).
      self.script = [((r, c), DO), ((r, c), move), (one, DO), (one, move), (two, OPPOSITE[move]),
                     (one, A.PLACE_STONE.value)]
      return self._face_and(v, move, DO) if int(v.direction) != move else self._follow_script(v)
    step = self._go(v, field)
    return step

  def _follow_script(self, v):
    pos = (int(v.position[0]), int(v.position[1]))
    expected, action = self.script[0]
    if expected != pos:
      self.script = []
      return None
    self.script.pop(0)
    return action


def make_policy(name: str, seed: int):
  """A fresh behaviour policy of skill ``name`` (one of POLICY_NAMES) for one episode."""
  if name not in SKILLS:
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
  skill = SKILLS[name]
  return RandomPolicy(seed) if skill is None else Planner(skill, seed)


# --- playing episodes --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
  world_seed: int
  policy: str


@dataclasses.dataclass
class StepChunk:
  """Consecutive recorded steps ``[start, start + len)`` of episode number ``episode``."""
  episode: int
  start: int
  steps: dict[str, np.ndarray]  # frames, actions, rewards, is_first, is_last, is_terminal, achievements


@dataclasses.dataclass
class EpisodeSummary:
  episode: int
  world_seed: int
  policy: str
  length: int  # recorded steps (frames); the policy acted length - 1 times
  terminal: bool  # the game ended (else truncated at max_episode_len)
  achievements: np.ndarray  # bool [22] at the end
  episode_return: float


class _Recording:
  """One running episode, and its steps not yet handed out as a chunk (when recording)."""

  def __init__(self, episode: int, spec: EpisodeSpec, policy, record: bool):
    self.episode, self.spec, self.policy, self.record = episode, spec, policy, record
    self.length = 0  # steps (frames) so far
    self.flushed = 0  # steps already handed out
    self.episode_return = 0.0
    self.rows = {k: [] for k in ("frames", "actions", "rewards", "is_first", "is_last", "is_terminal",
                                 "achievements")}

  def add_frame(self, frame, reward, achievements):
    self.length += 1
    self.episode_return += float(reward)
    if self.record:
      if frame is not None:
        self.rows["frames"].append(frame)
      self.rows["rewards"].append(reward)
      self.rows["is_first"].append(self.length == 1)
      self.rows["is_last"].append(False)
      self.rows["is_terminal"].append(False)
      self.rows["achievements"].append(np.array(achievements, bool))

  def add_action(self, action):
    if self.record:
      self.rows["actions"].append(action)

  def chunk(self) -> StepChunk:
    dtypes = dict(actions=np.int32, rewards=np.float32, is_first=bool, is_last=bool, is_terminal=bool,
                  achievements=bool, frames=np.uint8)
    steps = {k: np.asarray(np.stack(v), dtypes[k]) for k, v in self.rows.items() if v}
    chunk = StepChunk(self.episode, self.flushed, steps)
    self.flushed += len(self.rows["actions"])
    self.rows = {k: [] for k in self.rows}
    return chunk


def play_episodes(specs: Sequence[EpisodeSpec], *, num_envs: int, max_episode_len: int,
                  render: bool, chunk_len: int | None = None,
                  ) -> Iterator[StepChunk | EpisodeSummary]:
  """Plays ``specs`` in order on ``num_envs`` parallel games; yields chunks and episode summaries.

  Episode ``i`` (its index in ``specs``) is played on world ``specs[i].world_seed`` by a fresh
  ``specs[i].policy`` seeded from the world seed, so every episode is reproducible on its own. It
  ends when the game ends or after ``max_episode_len`` recorded steps. With ``chunk_len``, its steps
  come out as ``StepChunk``s of ``chunk_len`` steps (the last one shorter) before its summary;
  without, only summaries (an evaluation).
  """
  if max_episode_len < 2:
    raise ValueError(f"max_episode_len must be at least 2, got {max_episode_len}")
  # Slots without an episode idle; the batch keeps its size so that its compilation is reused.
  record = chunk_len is not None
  games = craftax_env.ParallelCraftax(num_envs, render=render and record)
  running: list[_Recording | None] = [None] * num_envs
  views: dict[str, np.ndarray] = {}
  next_episode = 0

  def start(slot):
    nonlocal next_episode
    spec = specs[next_episode]
    frame, view = games.reset_slot(slot, spec.world_seed)
    # The policy's seed mixes the world seed with its name, so skills differ on one world.
    seed = spec.world_seed * 1_000_003 + POLICY_NAMES.index(spec.policy)
    running[slot] = _Recording(next_episode, spec, make_policy(spec.policy, seed), record)
    running[slot].add_frame(frame, np.float32(0.0), view.achievements)
    for f in dataclasses.fields(view):
      if f.name not in views:
        views[f.name] = np.repeat(getattr(view, f.name)[None], num_envs, 0)
      views[f.name][slot] = getattr(view, f.name)
    next_episode += 1

  for slot in range(min(num_envs, len(specs))):
    start(slot)
  while any(r is not None for r in running):
    batch_view = craftax_env.SymbolicView(**views)
    actions = np.zeros(num_envs, np.int32)
    for slot, rec in enumerate(running):
      if rec is not None:
        actions[slot] = rec.policy.act(craftax_env.slot_view(batch_view, slot))
        rec.add_action(actions[slot])
        if record and len(rec.rows["actions"]) >= chunk_len:
          yield rec.chunk()
    frames, rewards, terminals, new_view = games.step(actions)
    views = {f.name: np.array(getattr(new_view, f.name)) for f in dataclasses.fields(new_view)}
    for slot, rec in enumerate(running):
      if rec is None:
        continue
      rec.add_frame(None if frames is None else frames[slot], rewards[slot],
                    views["achievements"][slot])
      terminal = bool(terminals[slot])
      if not terminal and rec.length < max_episode_len:
        continue
      if record:
        rec.add_action(np.int32(NOOP))  # the last frame has no action
        rec.rows["is_last"][-1] = True
        rec.rows["is_terminal"][-1] = terminal
        yield rec.chunk()
      yield EpisodeSummary(rec.episode, rec.spec.world_seed, rec.spec.policy, rec.length, terminal,
                           views["achievements"][slot].copy(), rec.episode_return)
      running[slot] = None
      if next_episode < len(specs):
        start(slot)
