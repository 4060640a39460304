"""Every decoder over the same frozen denoiser (and filter), on the first held-out problems.

  python -m jaxai.diffusion_lm.decode --config=configs/diffusion_lm.py[:variant] --workdir=DIR \
      [--decoders=one_per_step,llada,fast_dllm,learn2pd,eotp,learn2pd_eotp] [--gen_lens=256,1024] \
      [--problems=64] [--show=2]

The denoiser and the filter are built as their stages were trained (``DIR/<stage>/config.json``);
a generation length other than the trained one only changes how many positions are decoded. One
JSON line per (decoder, generation length): held-out accuracy (the tasks' own scorers), denoiser
calls per answer (mean), wall seconds of the decoding (compilation excluded: each decoder is
compiled ahead of time), answers per second, and the speed-ups over ``one_per_step`` at the same
length in calls and in wall time, measured in this run. ``one_per_step``'s line also gives
``after_eot_share``: the share of its calls spent after its answers were final through their
end-of-text (what EoTP saves). Where ``one_per_step`` is left out but ``eotp`` is run (one token
per step at length 1024 is by far the costliest decode), its line is derived from ``eotp``'s
(``derived_reference``: the same answers, ``gen_len`` calls, no wall time). A length's lines are
printed once all its decoders have run; stderr says as each one finishes. ``--show`` adds that
many decoded answers beside their references. Decoders that need the filter are skipped, with a
note on stderr, when no filter stage was trained.
"""
import json
import sys
import time

from absl import flags

from jaxai import cli, config_lib, host


def define_flags():
  cli.define_config_flag("configs/diffusion_lm.py")
  flags.DEFINE_string("workdir", None, "A run with a trained diffusion_lm stage (and filter).")
  flags.DEFINE_list("decoders", ["one_per_step", "llada", "fast_dllm", "learn2pd", "eotp", "learn2pd_eotp"],
                    "Decoders (jaxai.diffusion_lm.decoding.DECODERS), in the order run.")
  flags.DEFINE_list("gen_lens", ["256", "1024"], "Generation lengths (multiples of data.block_len).")
  flags.DEFINE_integer("problems", 64, "Held-out problems decoded (the first ones).")
  flags.DEFINE_integer("show", 0, "Decoded answers shown per line, beside the reference.")


def run_decoders(config, workdir: str, *, decoders, gen_lens, problems: int, show: int = 0):
  """Yields the JSON records described in the module docstring."""
  from jaxai import stages  # pylint: disable=g-import-not-at-top
  from jaxai.diffusion_lm import decoding, learn2pd, task, tasks  # pylint: disable=g-import-not-at-top
  for name in decoders:
    if name not in decoding.DECODERS:
      raise config_lib.ConfigError("decoders", f"unknown decoder {name!r}; choose from {', '.join(decoding.DECODERS)}")
  trained = task.load_denoiser(config, workdir)
  c = trained.config
  for gen_len in gen_lens:
    config_lib.check(gen_len > 0 and gen_len % c.data.block_len == 0, "gen_lens",
                     f"{gen_len} is not a positive multiple of data.block_len={c.data.block_len}")
  filter_params = filter_model = None
  if any(decoding.DECODERS[n].rule == "learn2pd" for n in decoders):
    try:
      f = stages.load_stage(c, workdir, "filter", sections=("filter",))
      filter_model, filter_params = learn2pd.Filter(f.config.filter.hidden), f.params
    except FileNotFoundError:
      print("no trained filter stage: the learn2pd decoders are skipped", file=sys.stderr)
      decoders = [n for n in decoders if decoding.DECODERS[n].rule != "learn2pd"]
  model = task.make_model(c)
  heldout = task.problems(c, "heldout")
  count = min(problems, len(heldout))
  prompts = heldout.tokens[:count, :c.data.prompt_len]
  size = c.decoding.batch_size
  first_batch = next(task.padded_batches(prompts, size))[0]
  for gen_len in gen_lens:
    records = {}
    for name in decoders:
      # Compiled ahead of time, so the timing below excludes compilation without a warm-up decode.
      decode = task.make_decode(c, model, name, gen_len, filter_model).lower(
          trained.params, first_batch, filter_params).compile()
      start = time.perf_counter()
      generated, calls, eot_calls = task.decode_rows(decode, trained.params, prompts, size, filter_params)
      seconds = time.perf_counter() - start
      right = tasks.solved(heldout, generated)
      record = {"decoder": name, "gen_len": gen_len, "problems": count, "denoiser_step": trained.step,
                "accuracy": round(float(right.mean()), 4), "calls_per_answer": round(float(calls.mean()), 2),
                "seconds": round(seconds, 2), "answers_per_second": round(count / seconds, 3)}
      if name == "one_per_step":
        record["after_eot_share"] = round(float(1.0 - eot_calls.sum() / calls.sum()), 4)
      if show:
        record["answers"] = [{"got": tasks.decode_answer(g), "want": e["answer"]}
                             for g, e in zip(generated[:show], heldout.entries[:show])]
      records[name] = record
      if name == "eotp":
        eotp_calls = calls
      print(f"decoded {count} problems with {name} at length {gen_len} in {seconds:.1f} s", file=sys.stderr, flush=True)
    if "one_per_step" not in records and "eotp" in records:
      records = {"one_per_step": derived_reference(records["eotp"], eotp_calls), **records}
    reference = records.get("one_per_step")
    for record in records.values():
      if reference is not None:
        record["calls_speedup"] = round(reference["calls_per_answer"] / record["calls_per_answer"], 2)
        if reference["seconds"] is not None:
          record["wall_speedup"] = round(reference["seconds"] / record["seconds"], 2)
      record["host"] = host.summary()
      yield record


def derived_reference(eotp: dict, eotp_calls) -> dict:
  """The one-per-step record implied by the ``eotp`` decode (its record and per-answer calls),
  without running it: until its stop, EoTP's decode is the one-per-step decode (so the same
  answers: the tests check this), and one per step always takes ``gen_len`` calls, so its
  ``after_eot_share`` is the same formula as a measured one's. Its wall time is unknown (None)."""
  gen_len = eotp["gen_len"]
  return {"decoder": "one_per_step", "derived_from": "eotp", "gen_len": gen_len, "problems": eotp["problems"],
          "denoiser_step": eotp["denoiser_step"], "accuracy": eotp["accuracy"], "calls_per_answer": float(gen_len),
          "seconds": None, "answers_per_second": None,
          "after_eot_share": round(float(1.0 - eotp_calls.sum() / (len(eotp_calls) * gen_len)), 4)}


def main(argv):
  del argv
  args, config = cli.start("configs/diffusion_lm.py[:variant]", workdir="a run with a trained diffusion_lm stage",
                           at_least_one=("problems",))
  from jaxai import checkpointing  # pylint: disable=g-import-not-at-top
  try:
    gen_lens = [int(x) for x in args.gen_lens]
  except ValueError:
    cli.fail("config error", f"gen_lens: integers expected, got {','.join(args.gen_lens)}")
  try:
    for record in run_decoders(config, args.workdir, decoders=args.decoders, gen_lens=gen_lens,
                               problems=args.problems, show=args.show):
      print(json.dumps(record), flush=True)
  except config_lib.ConfigError as e:
    cli.fail("config error", str(e))
  except (FileNotFoundError, checkpointing.CheckpointCorrupt) as e:
    cli.fail("checkpoint error", f"{e} (train the diffusion_lm stage first)")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
