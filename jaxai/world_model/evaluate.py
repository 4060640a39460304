"""The held-out evaluation of a trained world model, as one JSON line.

  python -m jaxai.world_model.evaluate --config=configs/world_model.py --workdir=DIR [--seed=N]
      [--config.rollout.eval_windows=128] [--config.rollout.action_states=128]

prints the evaluation the training run logs (``rollout_eval``: rollout PSNR against its baselines,
the Frechet latent and change distances, action top-1) of the run's latest dynamics checkpoint,
computed as in training (its ``compute_dtype``, the model and tokenizer as trained); ``--seed``
changes the rollout noise (default: the one training used at that step). Use it to evaluate on
more windows than training affords, or with other noise. Image strips go to ``DIR/evaluate/``.
Quality against the number of sampling steps on long generations: ``jaxai.world_model.nfe_curve``.
"""
import json
import os

from absl import flags

from jaxai import cli


def define_flags():
  cli.define_config_flag("configs/world_model.py")
  flags.DEFINE_string("workdir", None, "A run trained with --config.stage=all (or both stages).")
  flags.DEFINE_integer("seed", None, "Noise of the rollouts (default: the one training used at that step).")


def evaluate_run(config, workdir: str, *, seed: int | None = None) -> dict:
  """The held-out evaluation (``dynamics_stage.heldout_evaluator``) of the latest dynamics checkpoint
  in ``workdir``, in the compute dtype training evaluates in."""
  from jaxai.world_model import dynamics_stage  # pylint: disable=g-import-not-at-top
  run = dynamics_stage.load_run(config, workdir)
  evaluate = dynamics_stage.heldout_evaluator(run.config, workdir, run.dynamics, run.tokenizer,
                                              out_dir=os.path.join(workdir, "evaluate"))
  return {"step": run.step, "eval_windows": run.config.rollout.eval_windows, "seed": seed,
          **evaluate(run.params, run.step, seed=seed)}


def main(argv):
  del argv
  args, config = cli.start("configs/world_model.py[:variant]", workdir="a trained world model")
  if config.rollout.eval_windows < 1:
    cli.fail("config error", f"rollout.eval_windows: must be positive, got {config.rollout.eval_windows}")
  from jaxai.world_model import app_errors  # pylint: disable=g-import-not-at-top
  with app_errors.one_line_errors():
    record = evaluate_run(config, args.workdir, seed=args.seed)
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
