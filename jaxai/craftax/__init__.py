"""Craftax-Classic, the offline stand-in for Minecraft: the game, behaviour policies, recorded data.

- ``env``: making the game, stepping many in parallel (jit/vmap), frames as uint8, achievements.
- ``policies``: the behaviour policies (a rule-based planner on the game state at several skill
  levels, and uniform random) and ``play_episodes``, which plays and records them.
- ``dataset``: the ``craftax_offline`` TFDS dataset (ArrayRecord) and its grain window reader:
  ``generate(data_dir, variant)``, ``window_dataset(data_dir, split, window_len, ...)``.
- ``evaluation``: the real-game harness every policy is measured with (pixel agents and the
  behaviour planners, on the same evaluation worlds): ``play``, ``summarize`` (success rates with
  95% Wilson intervals, Crafter score), ``write_gif``.
- ``evaluate_policies``: ``python -m jaxai.craftax.evaluate_policies`` measures each policy's skill.
"""
