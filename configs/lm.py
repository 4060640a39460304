r"""Byte-level decoder LM on the Python standard library's source: the trunk's first real model.

It exercises every trunk piece (sharded init, jitted step, checkpoints, grain data, metrics) and
the LM's KV-cached sampling, on a corpus that exists offline on every machine. One stage, ``lm``,
trained in WORKDIR/lm/.

Variants:
  tiny     CPU, seconds. Used by the tests (meshes 1x1x1, 8x1x1, 2x2x2, 1x2x4 give the same losses).
  default  CPU (2 cores): 3.3M parameters, 256-byte sequences, batch 16, 1000 steps, bf16.
  full     TPU/GPU: 16 layers, width 1024, 2048-byte context, batch 256, bf16, scan + remat.

Commands:
  python -m jaxai.main --config=configs/lm.py --workdir=DIR
  python -m jaxai.lm.sample --config=configs/lm.py --workdir=DIR --prompt='def main(' \
      [--max_new_tokens=200 --temperature=0.8 --top_k=0 --top_p=1.0 --stop='\n']
  python -m jaxai.lm.bench_decode --config=configs/lm.py [--workdir=DIR]   # decode tokens/s, batch 1 and 32
  python -m jaxai.main --config=configs/lm.py:full --workdir=DIR --dry_run [--topology=v5e:16x16]

Figure to expect (default variant, 2 CPU cores, an AVX-512 host, no AMX): held-out 2.16 / 1.85 /
1.68 / 1.60 bits/byte at steps 250 / 500 / 750 / 1000, in 18 min (0.84-0.97 steps/s); decoding
the trained model (bf16, 128-byte prompts, 128 new bytes) 836 tokens/s at batch 1 and 2840 at
batch 32, 10.6x faster than recomputing the prefix at every token. Details: docs/lm.md.
"""
from jaxai import config_lib


def get_config(arg=None):
  variant = config_lib.parse_variant(arg, ("tiny", "default", "full"), default="default")
  c = config_lib.trainer_config(task="lm")
  c.stages = dict(lm=config_lib.stage_overlay())  # one stage: it trains in WORKDIR/lm
  c.data = dict(source="stdlib", seq_len=256, eval_windows=256)
  # scan_layers / remat (none | full | dots): scanned and rematerialised blocks cost time on CPU;
  # the full variant turns them on.
  c.model = dict(width=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32, mlp_hidden=768,
                 qk_norm=True, attn_soft_cap=50.0, logit_soft_cap=30.0, window_tokens=0,
                 scan_layers=False, remat="none")
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
    c.model.update(width=1024, num_layers=16, num_heads=16, num_kv_heads=4, head_dim=64, mlp_hidden=4096,
                   scan_layers=True, remat="dots")
    c.batch_size = 256
    c.total_steps = 100_000
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 2000
    c.optimizer.learning_rate = 6e-4
    c.optimizer.warmup_steps = 2000
    c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c
