"""The world-model task: its stages and their config checks. Nothing imports this module but the
trunk's registry (``jaxai.stages.REGISTRY``).

Stages (``config.stages``): ``tokenizer`` (``tokenizer_stage``), ``dynamics`` on the frozen
tokenizer's latents (``dynamics_stage``), both in turn with ``stage=all``; ``agent``
(``agent_stage``), the agent's finetuning from the dynamics checkpoint, and ``imagination``
(``imagination``), its RL in the frozen world model, both run by name for now; ``pixel_bc``
(``pixel_bc``), the agent's baseline: behaviour cloning from pixels without a world model, run by
name; and ``synthetic_actions`` (``synthetic_actions``), a diagnostic of the dynamics objective
run only by name.
"""
import ml_collections

from jaxai import config_lib, stages
from jaxai.world_model import agent_stage, data, dynamics_stage, imagination, pixel_bc
from jaxai.world_model import synthetic_actions, tokenizer_stage

BUILDERS = {"tokenizer": tokenizer_stage.build, "dynamics": dynamics_stage.build,
            "synthetic_actions": synthetic_actions.build, "agent": agent_stage.build,
            "imagination": imagination.build, "pixel_bc": pixel_bc.build}


def validate(config: ml_collections.ConfigDict) -> None:
  for name in config.stages:
    config_lib.check(name in BUILDERS, "stages", f"unknown stage {name!r}; the world model has "
                     f"{', '.join(BUILDERS)}")
  tokenizer_stage.validate(config)
  data.validate(config)
  names = stages.selected(config)
  if set(names) & {"dynamics", "synthetic_actions", "agent", "imagination"}:
    dynamics_stage.validate(config)
  if set(names) & {"agent", "imagination", "pixel_bc"}:
    agent_stage.validate(config)
  if "pixel_bc" in names:
    pixel_bc.validate(config)
  if "imagination" in names:
    imagination.validate(config)
  config_lib.check_positive(config, "synthetic_actions.eval_sequences")


def build_stage(config: ml_collections.ConfigDict, workdir: str) -> stages.Stage:
  return BUILDERS[config.stage](config, workdir)
