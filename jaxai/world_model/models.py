"""The world model's networks built from a config: the tokenizer (``config.tokenizer``) and the
dynamics model (``config.dynamics``, on the tokenizer's latent sizes)."""
import ml_collections

from jaxai import config_lib
from jaxai.nn import transformer
from jaxai.world_model import agent_heads
from jaxai.world_model import dynamics as dynamics_lib
from jaxai.world_model import tokenizer as tokenizer_lib

FRAME_SHAPE = (63, 63, 3)  # Craftax-Classic pixels: 9 x 9 tiles of 7 x 7 pixels

# Fields added after runs were trained, with what those runs computed (``stages.as_trained``):
# today's default would build an older checkpoint as another model.
BEFORE_FIELDS = {"tokenizer": {"aligned_inputs": False},
                 # before 2026-12-02: bootstrap_fraction=0.25 (and redrawn next frames at d_min)
                 "dynamics": {"step_distribution": "shortcut_models", "bootstrap_teacher": "online"},
                 # before 2026-12-06: the tokenizer's RMS memory
                 "agent": {"loss_rms_decay": 0.99}}


def block_config(config: ml_collections.ConfigDict, section) -> transformer.BlockConfig:
  return transformer.block_config(section, compute_dtype=config.compute_dtype,
                                  attention_impl=config.attention_impl)


def make_tokenizer(config: ml_collections.ConfigDict) -> tokenizer_lib.Tokenizer:
  t = config.tokenizer
  return tokenizer_lib.Tokenizer(tokenizer_lib.TokenizerConfig(
      block=block_config(config, t), encoder_layers=t.encoder_layers, decoder_layers=t.decoder_layers,
      num_latents=t.num_latents, latent_channels=t.latent_channels, image_shape=FRAME_SHAPE,
      patch_size=t.patch_size, max_mask_prob=t.max_mask_prob, aligned_inputs=t.aligned_inputs))


def make_dynamics(config: ml_collections.ConfigDict, *, agent: bool = False) -> dynamics_lib.Dynamics:
  """The dynamics model; ``agent``: with the agent token and heads of ``config.agent``."""
  d, t = config.dynamics, config.tokenizer
  extra = {}
  if agent:
    a = config.agent
    extra = dict(num_tasks=len(a.tasks), heads=agent_heads.HeadsConfig(
        hidden=a.head_hidden, layers=a.head_layers, mtp_length=a.mtp_length, bins=a.twohot_bins))
  return dynamics_lib.Dynamics(dynamics_lib.DynamicsConfig(
      block=block_config(config, d), num_layers=d.num_layers, num_latents=t.num_latents,
      latent_channels=t.latent_channels, spatial_tokens=d.spatial_tokens, num_registers=d.num_registers,
      k_max=d.k_max, time_every=d.time_every, layout=d.layout, shortcut=d.shortcut,
      step_distribution=d.step_distribution,
      previous_frame=d.previous_frame, context_fraction=d.context_fraction,
      context_signal=config.rollout.context_signal, next_frame_fraction=d.next_frame_fraction,
      loss_impl=d.shortcut_loss_impl, **extra))


def rollout_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with the compute dtype of rollouts outside training (``rollout.compute_dtype``)."""
  if config.rollout.compute_dtype == config.compute_dtype:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.compute_dtype = config.rollout.compute_dtype
  return config


def check_num_steps(field: str, num_steps: int, k_max: int) -> None:
  """K sampling steps per frame: a power of two no larger than K_max (the finest trained step)."""
  config_lib.check(config_lib.is_power_of_two(num_steps) and num_steps <= k_max, field,
                   f"must be a power of two in [1, dynamics.k_max={k_max}], got {num_steps}")
