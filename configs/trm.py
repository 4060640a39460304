r"""TRM (tiny recursive models, arXiv 2510.04871) and its baselines on generated Sudoku and mazes.

One stage, ``trm``, trained in WORKDIR/trm/ with deep supervision (``jaxai/trm/task.py``); the
puzzles are generated into ``data.dir`` first (``jaxai/trm/dataset.py``). The model is
``model.reasoner``: trm (one 2-layer network, recursed), hrm (HRM-style: two networks, one-step
gradient) or single_pass (direct prediction, as many parameters as TRM at ``match_parameters``).

Variants (``configs/trm.py:VARIANT``; a task and a size, comma-separated, e.g. ``maze,tiny``):
  task  sudoku (default; MLP over the sequence) | maze (attention; 30x30 Maze-Hard, except that the
        CPU default trains on 12x12 mazes, ``data.variant=small``: the 30x30 runs at 0.022 steps/s
        on 2 cores)
  size  tiny (tests, seconds) | default (CPU, 2 cores) | full (the paper's hyperparameters: width
        512, batch 768, lr 1e-4 with 2000 warm-up steps then constant, weight decay 1.0, EMA
        0.999, 60K epochs of the 1,000 training puzzles; TPU/GPU)

Commands:
  python -m jaxai.main --config=configs/trm.py --workdir=DIR                       # TRM, Sudoku
  python -m jaxai.main --config=configs/trm.py --config.model.reasoner=hrm --workdir=DIR
  python -m jaxai.main --config=configs/trm.py --config.model.reasoner=single_pass --workdir=DIR
  python -m jaxai.main --config=configs/trm.py:maze --workdir=DIR                  # 12x12 mazes
  python -m jaxai.trm.evaluate --config=configs/trm.py --workdir=DIR [--puzzles=N] [--png=PATH]
  python -m jaxai.main --config=configs/trm.py:full --workdir=DIR --dry_run

Figure reached (2026-12-07, AVX-512-bf16 host, 2 cores; docs/trm.md "Comparison on the easy
split"): on the easy split (``--config.data.variant=easy``), 1000 updates, EMA weights, 500
held-out puzzles: exact accuracy TRM 9.2 / 5.8 / 2.4% (seeds 0-2; 24 min each at 0.73-0.87
steps/s), HRM-style 1.8 / 2.4 / 2.0% (12 min each), single pass 0.0% (3 seeds, 1.7 min each); TRM
on the extreme split (``small``) 2.2% (seed 0). Mazes, the CPU default (12x12, 1000 updates, 500
held-out mazes, seed 0): TRM 0.4% (38 min at 0.53-0.66 steps/s), HRM-style 2.0% (19 min), single
pass 0.0%. The 30x30 mazes ran at 0.022 steps/s on that host (about 12.6 h per 1000 updates): they
are for accelerators. Speed of the default Sudoku TRM
(420,657 parameters, width 128, batch 64), 2026-12-07, AVX2-only host, 2 cores: 0.20 steps/s in
bf16, 0.22-0.24 in fp32, so its 1000 steps take about 80 min there (an AMX host runs bf16 about
2-3x faster). The puzzles are generated first: Sudoku `default` ~19 min on 2 idle cores
(`--config.data.variant=small`, the same 1,000 training puzzles and 2,000 held-out: ~5 min).
"""
from jaxai import config_lib

TASKS = ("sudoku", "maze")
SIZES = ("tiny", "default", "full")


def _parse(arg: str | None) -> tuple[str, str]:
  parts = [p for p in (arg or "").split(",") if p]
  task = [p for p in parts if p in TASKS]
  size = [p for p in parts if p in SIZES]
  if len(task) + len(size) != len(parts) or len(task) > 1 or len(size) > 1:
    raise config_lib.ConfigError("config", f"unknown variant {arg!r}; give a task ({', '.join(TASKS)}) "
                                 f"and/or a size ({', '.join(SIZES)}), comma-separated")
  return (task or ["sudoku"])[0], (size or ["default"])[0]


def get_config(arg=None):
  task, size = _parse(arg)
  c = config_lib.trainer_config(task="trm")
  c.stages = dict(trm=config_lib.stage_overlay())
  c.data = dict(
      dir="data",            # holds trm_puzzles/<task>_<variant>/ (jaxai.trm.dataset); relative to cwd
      task=task,             # sudoku | maze
      # The dataset's variant: default (1,000 train, Sudoku 10,000 held-out: ~19 min to generate on
      # 2 idle AVX2 cores, once; maze 1,000 held-out 30x30) | small (Sudoku: its first 2,000
      # held-out, ~5 min; maze: 1,000 + 1,000 12x12 mazes, seconds, the maze CPU default) | easy
      # (Sudoku: 1,000 + 2,000 puzzles that need no search, 34 s; where a CPU run's exact accuracy
      # moves) | tiny (tests).
      variant="default",
      generate=True,         # generate the puzzles into dir first if missing; False: a missing dataset
                             # is a config error naming data.dir
      # Versions of each training puzzle: Sudoku's random validity-preserving transforms (the
      # paper's 1,000 per puzzle), or the 8 symmetries of a maze.
      copies=1000 if task == "sudoku" else 8,
      eval_puzzles=1000,     # held-out puzzles the in-training evaluation solves
  )
  c.model = dict(
      reasoner="trm",        # trm | hrm | single_pass
      mixer="mlp" if task == "sudoku" else "attention",
      width=128, num_layers=2, num_heads=4, expansion=4.0,
      hidden_multiple=8,     # SwiGLU hidden sizes rounded up to this (the official 256 at width 512)
      puzzle_tokens=16,      # prepended positions; the first a learned token shared by all puzzles
      rounds=3,              # T outer rounds per supervision step (HRM: high cycles)
      latent_steps=6 if task == "sudoku" else 4,  # n latent updates per round (HRM: low steps)
      one_step_gradient=False,  # TRM ablation: back-propagate only the last z and y updates
      match_parameters=True,    # single_pass: the layer count that gives it TRM's parameters
      match_depth=False,        # single_pass: repeat its stack (shared weights) to TRM's depth
  )
  # stagger_starts (not the paper's): start the batch's slots at different supervision steps, so
  # that not every update trains the same step of every example while the halt head never fires.
  c.supervision = dict(max_steps=16, exploration=0.1, halt_loss_weight=0.5, stagger_starts=False)
  c.ema_decay = 0.999
  # At 0.999 the average of a CPU run's first 1000 updates still holds 37% of the initial weights;
  # the warm-up (decay (1 + t) / (10 + t) until it reaches 0.999) averages the trained ones.
  c.ema_warmup = size != "full"
  c.optimizer.update(learning_rate=1e-3, warmup_steps=100, min_lr_ratio=1.0, weight_decay=1.0,
                     b1=0.9, b2=0.95)
  c.batch_size = 64
  c.total_steps = 1000     # about an hour or more per model on 2 CPU cores (docstring)
  c.log_every = 25
  c.eval_every = 250
  c.checkpoint_every = 250
  c.compute_dtype = "bfloat16"
  if task == "maze" and size == "default":
    # 12x12 mazes (160 positions). The 30x30 ones at this size (--config.data.variant=default)
    # need --config.grad_accum_steps=4 on a 24 GiB CPU host: at batch 64 the step asked XLA for one
    # 27 GB buffer (the last round's backward keeps every attention's [64, 4, 916, 916] scores);
    # 4 sequential micro-batches of 16 rows (the carry split with them) give the same update.
    c.data.variant = "small"
  if size == "tiny":
    c.data.update(variant="tiny", copies=2, eval_puzzles=4)
    c.model.update(width=32, num_heads=2, puzzle_tokens=2, rounds=2, latent_steps=2)
    c.supervision.max_steps = 3
    c.batch_size = 8  # the tests' 8 devices split it
    c.total_steps = 4
    c.log_every = 1
    c.eval_every = 0
    c.checkpoint_every = 2  # a test resumes from step 2
    c.compute_dtype = "float32"
    c.optimizer.warmup_steps = 2
  elif size == "full":
    c.model.update(width=512, num_heads=8, hidden_multiple=256)
    c.optimizer.update(learning_rate=1e-4, warmup_steps=2000)
    c.batch_size = 768
    c.total_steps = 60_000 * 1000 // 768  # 60K epochs of the 1,000 puzzles
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 5000
  return c
