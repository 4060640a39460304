r"""Dreamer 4 world model on Craftax-Classic. Issue 4: the causal tokenizer (stage ``tokenizer``).

Tokenizer: 63x63 frames cut into 81 patches of 7x7 pixels (one per game tile) + learned latent
tokens; encoder and decoder transformers with the paper's masks, block-causal over frames;
tanh bottleneck; masked autoencoding with patch drop probability ~ U(0, 0.9); loss MSE + 0.2 x
perceptual, each term divided by its RMS (see jaxai/world_model/tokenizer_loss.py).
Perceptual term: LPIPS needs VGG weights that cannot be downloaded here; substitute: the
image-gradient loss (squared error of horizontal and vertical pixel differences).

Variants:
  tiny     CPU, seconds; synthetic scrolling tile maps (no dataset needed). Used by the tests.
  default  CPU (2 cores), 45 minutes; single frames (window_len 1), bf16 compute:
             python -m jaxai.main --config=configs/world_model.py --config.stage=tokenizer \
                 --workdir=/tmp/wm
           (records the dataset into data/ first if it is missing: ~6 min, once; or record it
           with `python -m jaxai.craftax.dataset --data_dir=DIR` and pass --config.data.dir=DIR). Writes
           /tmp/wm/tokenizer/metrics.jsonl (eval/psnr, bottleneck_values, compression_ratio) and
           /tmp/wm/tokenizer/recon_step_<N>.png. Target: held-out PSNR >= 32 dB with a bottleneck
           16x smaller than the frame. Measured: see the report of issue 4 / README.
  full     accelerators: width 768, 8 + 8 layers, 8-frame windows, batch 256:
             python -m jaxai.main --config=configs/world_model.py:full --workdir=gs://bucket/wm
"""
from jaxai import config_lib


def get_config(arg=None):
  variant = config_lib.parse_variant(arg, ("tiny", "default", "full"), default="default")
  c = config_lib.trainer_config(task="world_model")
  c.stage = "tokenizer"  # tokenizer | dynamics | all (dynamics: issue 5)
  c.data = dict(
      source="craftax",       # craftax (recorded dataset in dir) | synthetic (procedural, for tests)
      dir="data",             # holds craftax_offline/<variant>/ (jaxai.craftax.dataset); relative to cwd
      variant="default",      # dataset variant that data.generate records
      generate=True,          # record the dataset into dir first if it is missing (~6 min, once);
                              # False: a missing dataset is a config error naming data.dir
      window_len=1,           # frames per training example (the tokenizer is causal over them)
      eval_frames=512,        # held-out frames for eval/psnr
      synthetic_windows=2048,  # windows of the synthetic source
  )
  c.tokenizer = dict(
      # Sized for 45 minutes on 2 CPU cores (~1 step/s at batch 64 in bf16); width 256 with 4+4
      # layers ran at 0.19 steps/s here, too slow to converge in that budget.
      width=128, encoder_layers=2, decoder_layers=2, num_heads=2, num_kv_heads=2, head_dim=64,
      mlp_hidden=384, qk_norm=True, attn_soft_cap=0.0,
      patch_size=7, num_latents=32, latent_channels=16,  # 512 values per frame: 23x smaller
      max_mask_prob=0.9, perceptual_weight=0.2,
  )
  c.batch_size = 64
  c.total_steps = 2400
  c.log_every = 50
  c.eval_every = 300
  c.checkpoint_every = 300
  c.compute_dtype = "bfloat16"
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.0
  if variant == "tiny":
    c.data.update(source="synthetic", window_len=2, eval_frames=16, synthetic_windows=64)
    c.tokenizer.update(width=32, encoder_layers=1, decoder_layers=1, num_heads=2, num_kv_heads=2,
                       head_dim=16, mlp_hidden=64, num_latents=4, latent_channels=8)
    c.batch_size = 8
    c.total_steps = 5
    c.log_every = 1
    c.eval_every = 0
    c.checkpoint_every = 5
    c.compute_dtype = "float32"
    c.optimizer.warmup_steps = 2
  elif variant == "full":
    c.data.update(window_len=8, eval_frames=2048)
    c.tokenizer.update(width=768, encoder_layers=8, decoder_layers=8, num_heads=12, num_kv_heads=4,
                       head_dim=64, mlp_hidden=3072, num_latents=32, latent_channels=16)
    c.batch_size = 256
    c.total_steps = 100_000
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 2000
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 2000
    c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c
