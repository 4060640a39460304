r"""Byte-level decoder LM on the Python standard library's source: the trunk's first real model.

Exercises every trunk piece (sharded init, jitted step, checkpoints, grain data, metrics) on a
real corpus that exists offline on every machine.

Variants:
  tiny     CPU, seconds. Used by the tests (meshes 1x1x1, 8x1x1, 2x2x2, 1x2x4 give the same losses).
  default  CPU, ~10 minutes on 2 cores:
             python -m jaxai.main --config=configs/lm.py --workdir=/tmp/lm
           Measured (2-core CPU, see README): held-out bits/byte in the README table.
  full     TPU/GPU: 16 layers, width 1024, 2048-byte context, bf16 compute:
             python -m jaxai.main --config=configs/lm.py:full --workdir=gs://bucket/lm
"""
from jaxai import config_lib


def get_config(arg=None):
  variant = config_lib.parse_variant(arg, ("tiny", "default", "full"), default="default")
  c = config_lib.trainer_config(task="lm")
  c.data = dict(source="stdlib", seq_len=256, eval_windows=256)
  c.model = dict(width=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32, mlp_hidden=768,
                 qk_norm=True, attn_soft_cap=50.0, logit_soft_cap=30.0, window_tokens=0)
  c.batch_size = 16
  c.total_steps = 1000
  c.log_every = 50
  c.eval_every = 250
  c.checkpoint_every = 250
  c.compute_dtype = "bfloat16"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 100
  if variant == "tiny":
    c.data.seq_len = 32
    c.data.eval_windows = 16
    c.model.update(width=64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16, mlp_hidden=128)
    c.batch_size = 8
    c.total_steps = 5
    c.log_every = 1
    c.eval_every = 0
    c.checkpoint_every = 5
    c.compute_dtype = "float32"
    c.optimizer.warmup_steps = 2
  elif variant == "full":
    c.data.seq_len = 2048
    c.model.update(width=1024, num_layers=16, num_heads=16, num_kv_heads=4, head_dim=64, mlp_hidden=4096)
    c.batch_size = 256
    c.total_steps = 100_000
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 2000
    c.optimizer.learning_rate = 6e-4
    c.optimizer.warmup_steps = 2000
    c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c
