"""Held-out accuracy of a trained TRM stage, and a picture of solved and failed puzzles.

  python -m jaxai.trm.evaluate --config=configs/trm.py[:variant] --workdir=DIR [--puzzles=1000] \
      [--png=PATH.png] [--step=N] [--weights=ema|raw]

The model is built as the run trained it (its ``data``, ``model`` and ``supervision`` sections from
``DIR/trm/config.json``) and scored with the weights' moving average, as the paper reports
(``task.evaluate_puzzles``: every puzzle through all supervision steps). ``--weights=raw`` scores
the trained weights themselves: the paper's "no EMA" ablation, since the average never feeds back
into training, so one run gives both. One JSON line: the checkpoint step, the reasoner and its
parameter count, ``eval/exact_accuracy`` (the whole answer right after the last step) with its 95%
Wilson interval, the accuracy after steps 1, 2, 4, 8, token accuracy, and the halt head's mean
step and accuracy at it. ``--png`` draws up to four solved and four failed puzzles (``pictures``).
"""
import json
import sys

from absl import flags

from jaxai import cli, config_lib, host


_CHECKPOINT_KEY = {"ema": "ema_params", "raw": "params"}  # --weights -> the checkpoint's entry
WEIGHTS = tuple(_CHECKPOINT_KEY)


def define_flags():
  cli.define_config_flag("configs/trm.py")
  flags.DEFINE_string("workdir", None, "A run with a trained trm stage.")
  flags.DEFINE_integer("puzzles", 1000, "Held-out puzzles to solve (the first ones of the split).")
  flags.DEFINE_string("png", None, "Write solved and failed puzzles to this PNG.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_enum("weights", "ema", WEIGHTS, "ema: the weights' moving average (the paper's "
                    "figures); raw: the trained weights (the no-EMA ablation).")


def evaluate(config, workdir: str, *, puzzles: int, step: int | None = None, weights: str = "ema"):
  """(JSON record, arrays of ``task.evaluate_puzzles``) of the run's trm stage, scored with
  ``weights`` (one of ``WEIGHTS``)."""
  if weights not in WEIGHTS:
    raise ValueError(f"weights: {weights!r}; choose one of {', '.join(WEIGHTS)}")
  from jaxai import stages  # pylint: disable=g-import-not-at-top
  from jaxai.trm import model as model_lib, task  # pylint: disable=g-import-not-at-top
  trained = stages.load_stage(config, workdir, "trm", sections=("data", "model", "supervision"),
                              step=step, key=_CHECKPOINT_KEY[weights])
  model = task.make_model(trained.config)
  solve = task.solver(model, trained.config.supervision.max_steps)
  scores, arrays = task.evaluate_puzzles(trained.config, solve, trained.params, puzzles)
  from scipy import stats  # pylint: disable=g-import-not-at-top
  solved = int(round(scores["eval/exact_accuracy"] * scores["eval/puzzles"]))
  interval = stats.binomtest(solved, scores["eval/puzzles"]).proportion_ci(method="wilson")
  low, high = interval.low, interval.high
  record = {"workdir": workdir, "step": trained.step, "task": trained.config.data.task,
            "reasoner": model.config.reasoner, "weights": weights,
            "parameters": model_lib.param_count(model.config),
            **scores, "eval/exact_accuracy_95": [round(low, 4), round(high, 4)], "host": host.summary()}
  return record, arrays


def main(argv):
  del argv
  args, config = cli.start("configs/trm.py[:variant]", workdir="a run with a trained trm stage",
                           at_least_one=("puzzles",))
  from jaxai import checkpointing  # pylint: disable=g-import-not-at-top
  from jaxai.trm import dataset, pictures  # pylint: disable=g-import-not-at-top
  try:
    with _stdout_to_stderr():
      record, arrays = evaluate(config, args.workdir, puzzles=args.puzzles, step=args.step,
                                weights=args.weights)
      if args.png:
        pictures.write_puzzles(args.png, record["task"], arrays)
        record["png"] = args.png
  except config_lib.ConfigError as e:
    cli.fail("config error", str(e))
  except (FileNotFoundError, checkpointing.CheckpointCorrupt) as e:
    cli.fail("checkpoint error", f"{e} (train the trm stage first)")
  except dataset.DatasetError as e:
    cli.fail("config error", f"data.dir: {e}")
  print(json.dumps(record), flush=True)


def _stdout_to_stderr():
  import contextlib  # pylint: disable=g-import-not-at-top
  return contextlib.redirect_stdout(sys.stderr)  # stdout keeps only the JSON line


if __name__ == "__main__":
  define_flags()
  cli.run(main)
