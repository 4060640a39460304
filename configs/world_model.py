r"""Dreamer 4 world model on Craftax-Classic: a causal tokenizer of 63x63 frames into 81 tile-aligned
latents x 8 (stage ``tokenizer``), then a dynamics model trained by shortcut forcing on the frozen
tokenizer's latents and the actions (stage ``dynamics``). ``stage=all`` (the default) runs both.
The agent's stages run by name: ``agent`` (task tokens, BC and reward heads, finetuned from the
dynamics) and ``imagination`` (PMPO in the frozen world model), and so does its baseline
``pixel_bc`` (behaviour cloning from pixels, no world model); ``synthetic_actions`` is a
diagnostic stage, also run only by name.

Variants:
  tiny     CPU, seconds: synthetic episodes with actions, no dataset; ``stage=all`` as written.
           Used by the tests.
  default  CPU (2 cores), bf16 compute; records the Craftax dataset into data.dir first if it is
           missing (4-7 min, once). Each stage trains and resumes in WORKDIR/<stage>/.
  full     accelerators: tokenizer width 768, 8 + 8 layers; dynamics width 1024, 16 layers,
           64-frame windows; batch 256; scan over layers and remat on.

Commands (DIR: a run's workdir):
  python -m jaxai.main --config=configs/world_model.py --workdir=DIR      # both stages
  python -m jaxai.main --config=configs/world_model.py --config.stage=tokenizer --workdir=DIR
  python -m jaxai.main --config=configs/world_model.py --config.stage=dynamics --workdir=DIR
  # the paper's no-shortcut ablation on DIR's tokenizer
  python -m jaxai.main --config=configs/world_model.py --config.stage=dynamics --workdir=DIR2 \
      --config.stages.dynamics.reads_from=DIR --config.dynamics.shortcut=False
  # the paper's objective (its d ~ 1/U{1..64}; the three training switches, on by default, off):
  # add to a dynamics run
      --config.dynamics.step_distribution=paper --config.dynamics.context_fraction=0 \
      --config.dynamics.next_frame_fraction=0 --config.dynamics.previous_frame=False
  # bootstrap targets from an EMA teacher (Frans et al.), its decay warmed up: add to a dynamics run
      --config.dynamics.bootstrap_teacher=ema --config.stages.dynamics.ema_decay=0.999 \
      --config.stages.dynamics.ema_warmup=True
  # quality against K = 1..64 on 64-frame generations, 3 noise seeds, JSON lines and a PNG
  python -m jaxai.world_model.nfe_curve --config=configs/world_model.py --workdir=DIR --workdir=DIR2 \
      --names=shortcut,no_shortcut --plot=nfe.png
  # held-out evaluation as one JSON line
  python -m jaxai.world_model.evaluate --config=configs/world_model.py --workdir=DIR \
      --config.rollout.eval_windows=128 --config.rollout.action_states=128 [--seed=N]
  python -m jaxai.world_model.rollout_gif --config=configs/world_model.py --workdir=DIR   # DIR/rollout.gif
  python -m jaxai.world_model.play --config=configs/world_model.py --workdir=DIR --port=8000
  python -m jaxai.world_model.bench_fps --config=configs/world_model.py [--workdir=DIR]
  python -m jaxai.world_model.profile_frame --config=configs/world_model.py   # matmul vs per-op time
  python -m jaxai.world_model.bench_vs_dreamer4 --config=configs/world_model.py \
      --torch_python=TORCHENV/bin/python    # against the PyTorch dreamer4 package, equal size
  # the agent: finetuning on DIR's dynamics, then RL in imagination, then the real game
  python -m jaxai.main --config=configs/world_model.py --config.stage=agent --workdir=AGENT \
      --config.stages.agent.reads_from=DIR
  python -m jaxai.main --config=configs/world_model.py --config.stage=imagination --workdir=AGENT
  python -m jaxai.world_model.evaluate_agent --config=configs/world_model.py --workdir=AGENT \
      --stage=imagination --task=all_achievements --episodes=64 [--gif=agent.gif]
  python -m jaxai.world_model.bench_agent --config=configs/world_model.py   # imagined frames/s
  python -m jaxai.world_model.play --config=configs/world_model.py --workdir=AGENT --agent=imagination
  # the baseline without a world model: behaviour cloning from pixels, then the real game
  python -m jaxai.main --config=configs/world_model.py --config.stage=pixel_bc --workdir=PBC
  python -m jaxai.world_model.evaluate_agent --config=configs/world_model.py --workdir=PBC \
      --stage=pixel_bc --task=all_achievements --episodes=64
  python -m jaxai.main --config=configs/world_model.py --config.stage=synthetic_actions --workdir=DIR \
      --config.stages.synthetic_actions.total_steps=2000
  python -m jaxai.main --config=configs/world_model.py:full --workdir=DIR --dry_run --topology=v5e:16x16

Figures to expect (default variant, 2 CPU cores):
  tokenizer: held-out eval/psnr 37.43 dB after 2700 steps in 40.6 min (32 dB at 22.8 min) on an
    AVX2-only host; about 20 min on an AMX host (estimated from
    its 2.2-2.4 steps/s on 2026-11-29).
  dynamics (default, K = 4, 1200 steps in 49.5 min on an AMX host on 2026-12-03, trained with
    --config.stages.dynamics.eval_every=0, then the evaluate command on 128 held-out windows):
    eval/rollout_psnr 19.07 dB (repeating the last frame: 18.74), eval/action_top1 0.727
    (chance 0.37); nfe_curve FLD 91.1 at K = 4 against 91.5 for the no-shortcut ablation. Before
    2026-12-02, when redrawn next frames began to keep a step size from the distribution: 19.26 dB,
    top-1 0.80 (AVX2 host, 57 min).
  interactive play (bench_fps interactive_fps): 44.1 FPS on the AVX2 host, 88.78 on an AMX host
    (2026-12-02); bench_vs_dreamer4 on the AMX host: 24.66 vs 3.496 FPS, ratio 7.054.
  step_distribution=paper was measured at 200 steps (AVX2 host, 16 windows x 64 imagined frames,
    nfe_curve): FLD 340 at K = 4 against 207 for the no-shortcut ablation, PSNR 10.6 vs 13.7 dB
    (docs/world_model.md).
  agent (2026-12-03, AMX host, a short first run: 600-step dynamics on a 1226-step tokenizer, then
    stage agent 600 steps at 0.4-0.48 steps/s and imagination 300 steps at 0.5-0.55 steps/s, then
    evaluate_agent with 64 episodes of at most 2000 frames): held-out BC top-1 0.222 (the majority
    action: 0.193), reward recall 0; in the real game Crafter score 2.28 after finetuning and 2.88
    after RL (random policy 1.98, expert 96.48), the intervals overlapping.
  agent at the default budgets (2026-12-06, AMX host: tokenizer 37.17 dB, dynamics 1200 steps with
    action top-1 0.719, agent 600 steps, imagination 300 with value_warmup_steps=100, pixel_bc 1500
    steps at 1.96 steps/s; evaluate_agent as above): Crafter score 3.29 (2.27-3.94) after
    finetuning, 2.84 (2.22-3.20) after RL, 3.10 (2.04-3.78) for BC from pixels; held-out BC top-1
    0.227 for the agent, 0.345 for BC from pixels (majority 0.193); reward recall 0; bench_agent
    imagined_fps 195.3 at batch 64, K = 4.
Details, earlier figures and what was tried: docs/world_model.md.
"""
from jaxai import config_lib


def get_config(arg=None):
  variant = config_lib.parse_variant(arg, ("tiny", "default", "full"), default="default")
  c = config_lib.trainer_config(task="world_model")
  c.stages = dict(
      # Batch 32 learned as much per step as batch 64 in the first 300 steps (train PSNR 18.4 at
      # step 300 both) at half the cost. 2700 steps: 41 min on an AVX2-only host, about 20 on an
      # AMX one; 37.43 dB held-out at the end, 32.47 at step 1500 (docs/world_model.md).
      tokenizer=config_lib.stage_overlay(
          batch_size=32, total_steps=2700, log_every=50, eval_every=300, checkpoint_every=300,
          optimizer=dict(learning_rate=2e-3, warmup_steps=100)),
      # 0.35 steps/s on an AVX2-only host (3 forward passes per step: the bootstrap's two half
      # steps). The figures of the docstring add --config.stages.dynamics.eval_every=600.
      dynamics=config_lib.stage_overlay(
          reads=("tokenizer",), batch_size=8, total_steps=1200, eval_every=400, checkpoint_every=200,
          log_every=50, optimizer=dict(learning_rate=1e-3, warmup_steps=100)),
      # Agent finetuning (jaxai/world_model/agent_stage.py): starts from the dynamics checkpoint
      # (init_from) and reads its tokenizer; run by name (stage=all skips it for now).
      agent=config_lib.stage_overlay(
          reads=("dynamics",), init_from="dynamics", in_all=False, batch_size=8, total_steps=600,
          eval_every=200, checkpoint_every=200, log_every=50,
          optimizer=dict(learning_rate=3e-4, warmup_steps=50)),
      # The agent's RL in imagination (jaxai/world_model/imagination.py): starts from the agent
      # stage, trains only the policy and value heads, the finetuned policy frozen as PMPO's prior.
      imagination=config_lib.stage_overlay(
          reads=("agent",), init_from="agent", in_all=False, batch_size=16, total_steps=300,
          eval_every=0, checkpoint_every=100, log_every=10, trainable=r"^heads/(policy|value)/",
          optimizer=dict(learning_rate=1e-4, warmup_steps=20)),
      # The agent's baseline (jaxai/world_model/pixel_bc.py): behaviour cloning from pixels, no
      # world model; reads only the dataset; run by name.
      pixel_bc=config_lib.stage_overlay(
          in_all=False, batch_size=8, total_steps=1500, eval_every=500, checkpoint_every=500,
          log_every=50, optimizer=dict(learning_rate=3e-4, warmup_steps=50)),
      # The diagnostic of jaxai/world_model/synthetic_actions.py, only by name (stage=all skips it).
      synthetic_actions=config_lib.stage_overlay(
          in_all=False, batch_size=8, total_steps=2000, eval_every=250, checkpoint_every=500,
          log_every=50, optimizer=dict(learning_rate=1e-3, warmup_steps=100)),
  )
  c.data = dict(
      source="craftax",       # craftax (recorded dataset in dir) | synthetic (procedural, no dataset)
      dir="data",             # holds craftax_offline/<variant>/ (jaxai.craftax.dataset); relative to cwd
      variant="default",      # dataset variant that data.generate records
      generate=True,          # record the dataset into dir first if it is missing (~6 min, once);
                              # False: a missing dataset is a config error naming data.dir
      window_len=1,           # frames per tokenizer training example (the tokenizer is causal over them)
      eval_frames=512,        # held-out frames for eval/psnr
      synthetic_episodes=64,  # train episodes of the synthetic source (held-out: 1/8 of it, >= 2)
      synthetic_episode_len=64,
  )
  c.tokenizer = dict(
      # Sized for 45 minutes on 2 CPU cores: 1.0-1.1 steps/s at batch 32 in bf16 on an AVX2-only
      # host, 2.2-2.4 on an AMX one (width 256 with 4+4 layers ran at 0.19 steps/s, too slow to
      # converge in that budget). 4 heads of 32 rather than 2 of 64.
      width=128, encoder_layers=2, decoder_layers=2, num_heads=4, num_kv_heads=4, head_dim=32,
      mlp_hidden=384, qk_norm=True, attn_soft_cap=0.0,
      # One latent per 7x7 tile (token_positions puts latent j on patch j), 8 values each: 648 per
      # frame, 18.4x smaller. 32 latents of 16 (23x) reached 24.7 dB in 43 min against 25.7 for
      # these, and their latents are not tied to places, so a move of the view is no shift of them.
      patch_size=7, num_latents=81, latent_channels=8,
      # Latent j starts from patch j's embedding and patch query j from latent j (not in the paper;
      # jaxai/world_model/tokenizer.py): held-out PSNR 27.9 dB at step 500 against 20.6-21.7
      # without, whose latents had not learnt to read their own tiles.
      aligned_inputs=True,
      # The image-gradient term (LPIPS stand-in) did not help: 600-step runs with weight 0 vs 0.2
      # gave held-out PSNR 21.44 vs 21.37 dB and edge MSE 0.00942 vs 0.00938, so it is off by
      # default.
      max_mask_prob=0.9, perceptual_weight=0.0,
      # Block stacks: scan over layers and rematerialisation (none | full | dots) cost time on
      # CPU; the full variant turns them on.
      scan_layers=False, remat="none",
  )
  c.dynamics = dict(
      width=128, num_layers=8, num_heads=4, num_kv_heads=2, head_dim=32, mlp_hidden=384,
      qk_norm=True, attn_soft_cap=50.0, scan_layers=False, remat="none",
      spatial_tokens=27,        # the 81 x 8 latents as 27 tokens of 24: three tiles of a row each
      num_registers=4,
      k_max=64,                 # d_min = 1/64, as in the paper
      time_every=4,             # a time-attention layer every 4th layer, space-only otherwise
      layout="factorised",      # factorised | full (block-causal over all tokens in every layer)
      shortcut=True,            # False: plain diffusion forcing at d_min (the paper's ablation)
      # Step sizes d of the shortcut model (jaxai/world_model/noise_levels.py): "shortcut_models"
      # (Frans et al. 2024: 1/4 of the frames bootstrap, d uniform above d_min, the rest at d_min)
      # or "paper" (Dreamer 4, d = 1 / U{1, 2, 4, ..., 64}). Frames redrawn as rollout context
      # below are at d_min (as a rollout's context is); frames redrawn as next frames keep a d
      # drawn from this distribution. Shares of frames in this config (expected_shares; each batch
      # logs step_share/d1_<n>): d = 1, 1/2, ..., 1/32 2.1% each, d_min 87.5%; the K = 4 sampler's
      # inputs (0, 1/4) 1.1%, (1/4, 1/4), (1/2, 1/4), (3/4, 1/4) 0.3% each, the context
      # (29/32, 1/64) 8.7%. "paper" instead: 7.1% per size above d_min, (0, 1/4) 3.9%, the other
      # K = 4 inputs 1.1% each; all switches off, 1/7 per size. "paper" learnt far slower here twice
      # (13.0 vs 17.2 dB at step 400 on 2026-11-27; FLD 340 vs 207 for the no-shortcut ablation
      # at step 200 on 2026-12-02, docs/world_model.md), so the default keeps 1/4 bootstrap frames
      # (FLD 192 +- 5.6 at step 200, against 207 +- 1.2 for the ablation).
      step_distribution="shortcut_models",
      # The bootstrap's half steps: "online" (the parameters being trained, as Dreamer 4 writes
      # nothing else) or "ema" (their moving average at stages.dynamics.ema_decay, as in Frans et al.).
      # "ema" at decay 0.99 diverged by step 200 (FLD 4850); with stages.dynamics.ema_warmup it
      # trains, but at 1200 steps it was no better (FLD 93.2 +- 4.8 vs 91.1 +- 1.1 at K = 4,
      # action top-1 0.703 vs 0.727; docs/world_model.md).
      bootstrap_teacher="online",
      # Three switches, not in the paper, on by default: without them the model here barely
      # learnt the action (held-out top-1 0.40 against 0.80 with them over 128 windows, chance 0.37) and trailed
      # copying the last frame (docs/world_model.md). The paper's objective:
      # step_distribution="paper", context_fraction=0.0, next_frame_fraction=0.0, previous_frame=False.
      # Fraction of frames redrawn as rollout context (signal >= rollout.context_signal, d_min);
      # 0: the paper's independent uniform tau.
      context_fraction=0.5,
      # Fraction of frames trained at tau = 0 (pure noise, d_min) right after a frame redrawn as
      # rollout context, weighted 1 instead of the ramp's 0.1: the first step of a rollout, where
      # only the context and the action tell the next frame. 0: the paper.
      next_frame_fraction=0.3,
      # Frame t - 1's latents as an input of frame t and a gated copy in its output
      # (jaxai/world_model/dynamics.py). False: the paper.
      previous_frame=True,
      window_len=32,            # long batches: windows of 32 frames
      short_window_len=8,       # the other batches: the same frames as windows of 8
      long_every=4,             # every 4th batch is long (0: always long)
      single_image_fraction=0.3,  # sequences trained with no time context
      train_episodes=120,       # train episodes encoded into the latent cache (0: all 400)
      # The fused Pallas loss (auto: where written for the backend) measured slower than XLA's
      # fusion of its reference on an H100 (0.186 vs 0.135 ms), so XLA everywhere by default.
      shortcut_loss_impl="xla",
  )
  c.rollout = dict(
      num_steps=4,              # K shortcut steps per generated frame
      baseline_steps=64,        # the same model sampled with K = 64 (eval baseline)
      context_signal=0.9,       # context frames are re-noised to this signal level (10% noise)
      context_frames=16, horizon=16,  # eval/rollout_psnr: 16 real frames, then 16 imagined
      # Held-out windows for eval/rollout_psnr and the Frechet latent distance. 32 resolve PSNR;
      # the distance's floor is 69 at 32 windows, 23 at 128 (python -m jaxai.world_model.evaluate).
      eval_windows=32,
      action_states=32,         # held-out states for eval/action_top1
      # Interactive play, rollout GIFs and the speed benchmark (training and its evals use
      # compute_dtype). At batch 1 bf16 gained little here (65.9 against 63.2 FPS on an AMX
      # host), so rollouts stay in fp32.
      compute_dtype="float32",
  )
  c.agent = dict(
      # One task per milestone of the crafting ladder (reward 1 when unlocked) and the game's own
      # reward (jaxai/world_model/agent_tasks.py).
      tasks=("collect_wood", "place_table", "make_wood_pickaxe", "collect_stone", "make_stone_pickaxe",
             "collect_iron", "make_iron_pickaxe", "collect_diamond", "all_achievements"),
      # Policy, reward and value MLPs on the agent token (jaxai/world_model/agent_heads.py); the
      # paper's multi-token prediction over L = 8 future steps; reward and value as two-hot
      # distributions over symlog-spaced bins (DreamerV3's 255).
      head_hidden=256, head_layers=2, mtp_length=8, twohot_bins=255,
      window_len=32,            # frames per window, in both halves of a batch
      eval_windows=64,          # held-out task windows for the heads' evaluation
      # Memory of the running RMS that divides each term (video, BC, reward). The tokenizer's 0.99
      # kept the zero-initialised reward head's first losses (log 255 = 5.5) in its mean square for
      # ~300 steps, so the reward term trained at about a fifth of its weight (docs/world_model.md,
      # "The third run"): 0.95 forgets them in ~100 steps.
      loss_rms_decay=0.95,
  )
  c.imagination = dict(
      task="all_achievements",  # the task the agent practises (one of agent.tasks)
      context_frames=8,         # recorded frames each imagined trajectory starts from
      horizon=16,               # imagined frames per trajectory, K = rollout.num_steps steps each
      # TD(lambda): Dreamer 4's gamma; its lambda is not given, 0.95 is DreamerV3's (our choice).
      gamma=0.997, lambda_=0.95,
      alpha=0.5, beta=0.3,      # PMPO (Dreamer 4's Eq. 11): weight of D+, and of the KL to the prior
      # Updates in which only the value head learns (our addition: the paper gives none). Without
      # it the first run's value trailed the returns for all 300 steps and D+ held 99.6-100% of the
      # states (docs/world_model.md, Agent).
      value_warmup_steps=100,
  )
  c.pixel_bc = dict(
      # Per frame: stride-2 3x3 convolutions (63 -> 4 pixels), a dense layer, the previous action's
      # and the task's embeddings, a GRU, the policy layer (jaxai/world_model/pixel_bc.py).
      channels=(32, 64, 64, 128), hidden=256,
      train_episodes=-1,        # -1: the episodes of the agent's latent cache (dynamics.train_episodes)
  )
  c.synthetic_actions = dict(eval_sequences=64)  # held-out sequences of the synthetic_actions stage
  c.compute_dtype = "bfloat16"
  c.optimizer.weight_decay = 0.0
  if variant == "tiny":
    # Synthetic episodes (no dataset): both stages, their evaluations and action top-1 run on them.
    c.data.update(source="synthetic", window_len=2, eval_frames=16, synthetic_episodes=8,
                  synthetic_episode_len=16)
    # The tiny variant keeps the perceptual term so that the tests cover the two-term loss.
    # 4 learned latents (not one per tile, so not aligned): the tokenizer tests cover aligned inputs.
    c.tokenizer.update(width=32, encoder_layers=1, decoder_layers=1, num_heads=2, num_kv_heads=2,
                       head_dim=16, mlp_hidden=64, num_latents=4, latent_channels=8,
                       perceptual_weight=0.2, aligned_inputs=False)
    c.compute_dtype = "float32"
    c.stages.tokenizer.update(batch_size=8, total_steps=5, log_every=1, eval_every=0, checkpoint_every=5)
    c.stages.tokenizer.optimizer.warmup_steps = 2
    c.dynamics.update(width=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_hidden=64,
                      spatial_tokens=4, num_registers=2, k_max=8, time_every=2, window_len=8,
                      short_window_len=4, long_every=2, train_episodes=0)
    for name, steps in (("dynamics", 4), ("synthetic_actions", 2)):
      c.stages[name].update(batch_size=8, total_steps=steps, eval_every=0, checkpoint_every=steps,
                            log_every=1)
      c.stages[name].optimizer.warmup_steps = 1
    c.rollout.update(baseline_steps=8, context_frames=4, horizon=4, eval_windows=4, action_states=2)
    c.synthetic_actions.eval_sequences = 4
    c.agent.update(tasks=("collect_wood", "all_achievements"), head_hidden=16, head_layers=1, mtp_length=2,
                   twohot_bins=15, window_len=8, eval_windows=4)
    c.stages.agent.update(batch_size=8, total_steps=3, eval_every=0, checkpoint_every=3, log_every=1)
    c.stages.agent.optimizer.warmup_steps = 1
    c.imagination.update(task="collect_wood", context_frames=3, horizon=4, value_warmup_steps=1)
    c.stages.imagination.update(batch_size=8, total_steps=3, checkpoint_every=3, log_every=1)
    c.stages.imagination.optimizer.warmup_steps = 1
    c.pixel_bc.update(channels=(4, 8), hidden=16)
    c.stages.pixel_bc.update(batch_size=8, total_steps=3, eval_every=3, checkpoint_every=3, log_every=1)
    c.stages.pixel_bc.optimizer.warmup_steps = 1
  elif variant == "full":
    c.data.update(window_len=8, eval_frames=2048)
    # The same 81 x 8 bottleneck (and 27 dynamics tokens) as the default: wider and deeper models,
    # the same latent space.
    c.tokenizer.update(width=768, encoder_layers=8, decoder_layers=8, num_heads=12, num_kv_heads=4,
                       head_dim=64, mlp_hidden=3072, scan_layers=True, remat="dots")
    c.stages.tokenizer.update(batch_size=256, total_steps=100_000, log_every=100, eval_every=5000,
                              checkpoint_every=2000)
    c.stages.tokenizer.optimizer.update(learning_rate=3e-4, warmup_steps=2000)
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.dynamics.update(width=1024, num_layers=16, num_heads=16, num_kv_heads=4, head_dim=64,
                      mlp_hidden=4096, window_len=64, short_window_len=16, train_episodes=0,
                      scan_layers=True, remat="dots")
    c.rollout.compute_dtype = "bfloat16"
    c.stages.dynamics.update(batch_size=256, total_steps=100_000, eval_every=5000, checkpoint_every=2000,
                             log_every=100)
    c.stages.dynamics.optimizer.update(learning_rate=3e-4, warmup_steps=2000)
    c.agent.update(window_len=64, head_hidden=1024, eval_windows=512)
    c.stages.agent.update(batch_size=128, total_steps=20_000, eval_every=2000, checkpoint_every=2000,
                          log_every=100)
    c.stages.agent.optimizer.update(learning_rate=1e-4, warmup_steps=1000)
    c.imagination.update(context_frames=16, horizon=32, value_warmup_steps=1000)
    c.stages.imagination.update(batch_size=128, total_steps=10_000, checkpoint_every=1000, log_every=100)
    c.pixel_bc.update(channels=(64, 128, 256, 256), hidden=1024, train_episodes=0)
    c.stages.pixel_bc.update(batch_size=128, total_steps=20_000, eval_every=2000, checkpoint_every=2000,
                             log_every=100)
  return c
