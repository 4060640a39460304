"""The decoders against a plain per-row numpy replay of the rules written in the module docstring,
on a small random denoiser whose predictions change with every token finalised."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxai.diffusion_lm import decoding, tasks

PROMPT, GEN, BLOCK, ROWS = 6, 16, 4, 5


def _denoiser():
  """logits [B, L, V]: a random function of the row's mean token embedding and the position, with
  end-of-text certain from a place set by the prompt's first token on (so answers end, at
  different places per row) and ruled out before it."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"embed": jax.random.normal(k1, (tasks.VOCAB_SIZE, 8)),
            "position": jax.random.normal(k2, (PROMPT + GEN, 8)),
            "out": jax.random.normal(k3, (8, tasks.VOCAB_SIZE)) * 3.0}

  def denoise(p, tokens):
    h = jnp.tanh(p["embed"][tokens].mean(1, keepdims=True) * 4.0 + p["position"][None, :tokens.shape[1]])
    logits = h @ p["out"]
    end = PROMPT + 5 + tokens[:, :1] % 9  # [B, 1]
    return logits.at[..., tasks.EOT].set(jnp.where(jnp.arange(tokens.shape[1]) >= end, 50.0, -50.0))
  return denoise, params


def _prompts():
  return jax.random.randint(jax.random.key(1), (ROWS, PROMPT), 97, 123)


def _filter_apply(_, confidences):
  return 20.0 * (confidences - 0.3)


def _reference(denoise, params, prompt, rule, eotp, *, steps=2, threshold=0.9, tau=0.96, oracle_ref=None):
  """Plain replay of one row; asserts that finalised tokens never change. Returns (tokens, calls,
  eot_calls, oracle log rows)."""
  gen = np.full(GEN, tasks.MASK)
  final = np.zeros(GEN, bool)
  calls, eot_calls, log = 0, None, []
  for block in range(GEN // BLOCK):
    block_step = 0
    while not final[block * BLOCK:(block + 1) * BLOCK].all():
      tokens = np.concatenate([prompt, np.where(final, gen, tasks.MASK)])[None]
      # float32 as the decoder computes it: near-certain positions tie at 1.0 there, and the tie
      # goes to the first position
      logits = np.array(denoise(params, jnp.asarray(tokens)))[0, PROMPT:].astype(np.float32)
      logits[:, [tasks.MASK, tasks.PAD]] = -np.inf
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      pred, conf = logits.argmax(-1), probs.max(-1)
      cand = np.zeros(GEN, bool)
      cand[block * BLOCK:(block + 1) * BLOCK] = ~final[block * BLOCK:(block + 1) * BLOCK]
      idx = np.flatnonzero(cand)
      best = idx[np.argmax(conf[idx])]
      write = pred.copy()
      if rule == "one_per_step":
        chosen = [best]
      elif rule == "fixed_steps":
        count = BLOCK // steps + (block_step < BLOCK % steps)
        chosen = idx[np.argsort(-conf[idx], kind="stable")][:count]
      elif rule == "threshold":
        chosen = sorted(set(idx[conf[idx] >= threshold]) | {best})
      elif rule == "learn2pd":
        view = np.where(final, 1.0, conf)[block * BLOCK:(block + 1) * BLOCK]
        keep = 1 / (1 + np.exp(-np.array(_filter_apply(None, jnp.asarray(view))))) > tau
        chosen = sorted(set(idx[keep[idx - block * BLOCK]]) | {best})
      else:  # oracle
        view = np.where(final, 1.0, conf)[block * BLOCK:(block + 1) * BLOCK]
        log.append((view, (pred == oracle_ref)[block * BLOCK:(block + 1) * BLOCK],
                    cand[block * BLOCK:(block + 1) * BLOCK]))
        right = idx[pred[idx] == oracle_ref[idx]]
        chosen = right if len(right) else [best]
        write = oracle_ref
      before = gen.copy()
      for i in chosen:
        assert not final[i]
        gen[i], final[i] = write[i], True
      np.testing.assert_array_equal(gen[final & (before != tasks.MASK)], before[final & (before != tasks.MASK)])
      calls += 1
      block_step += 1
      ends = [p for p in range(GEN) if final[p] and gen[p] == tasks.EOT and final[:p].all()]
      if ends and eot_calls is None:
        eot_calls = calls
        if eotp:
          gen[ends[0] + 1:] = tasks.EOT
          return gen, calls, eot_calls, log
  return gen, calls, calls if eot_calls is None else eot_calls, log


CASES = [("one_per_step", False), ("fixed_steps", False), ("threshold", False), ("learn2pd", False),
         ("one_per_step", True), ("learn2pd", True), ("threshold", True)]


@pytest.mark.parametrize("rule, eotp", CASES)
def test_each_decoder_matches_a_plain_replay_of_its_rule(rule, eotp):
  denoise, params = _denoiser()
  prompts = _prompts()
  decoder = decoding.Decoder(rule, eotp=eotp, steps_per_block=3, threshold=0.5, tau=0.6)
  run = jax.jit(functools.partial(decoding.decode, denoise, gen_len=GEN, block_len=BLOCK, decoder=decoder,
                                  filter_apply=_filter_apply))
  out = jax.device_get(run(params, prompts, filter_params=None))
  assert not np.any(out.tokens == tasks.MASK)
  for row in range(ROWS):
    tokens, calls, eot_calls, _ = _reference(denoise, params, np.asarray(prompts[row]), rule, eotp,
                                             steps=3, threshold=0.5, tau=0.6)
    np.testing.assert_array_equal(out.tokens[row], tokens)
    assert (out.calls[row], out.eot_calls[row]) == (calls, eot_calls), row
  if rule == "one_per_step" and not eotp:
    assert np.all(out.calls == GEN)  # steps = length


@pytest.mark.parametrize("rule", ["one_per_step", "learn2pd"])
def test_eotp_stops_at_the_answers_end_and_keeps_the_full_decodes_answer(rule):
  denoise, params = _denoiser()
  prompts = _prompts()
  run = lambda eotp: jax.device_get(jax.jit(functools.partial(
      decoding.decode, denoise, gen_len=GEN, block_len=BLOCK, decoder=decoding.Decoder(rule, eotp=eotp, tau=0.6),
      filter_apply=_filter_apply))(params, prompts, filter_params=None))
  full, stopped = run(False), run(True)
  np.testing.assert_array_equal(stopped.calls, full.eot_calls)  # what the full decode reports
  assert np.any(stopped.calls < full.calls)  # this denoiser's answers end before the region does
  for row in range(ROWS):
    assert tasks.decode_answer(stopped.tokens[row]) == tasks.decode_answer(full.tokens[row])
    end = int(np.flatnonzero(full.tokens[row] == tasks.EOT)[0])
    np.testing.assert_array_equal(stopped.tokens[row, :end + 1], full.tokens[row, :end + 1])
    assert np.all(stopped.tokens[row, end:] == tasks.EOT)


def test_oracle_labels_match_a_plain_replay():
  denoise, params = _denoiser()
  prompts = _prompts()
  reference = jax.jit(functools.partial(decoding.decode, denoise, gen_len=GEN, block_len=BLOCK,
                                        decoder=decoding.Decoder()))(params, prompts).tokens
  log, replay = jax.jit(functools.partial(decoding.oracle_labels, denoise, gen_len=GEN, block_len=BLOCK))(
      params, prompts, reference)
  log, replay, reference = jax.device_get((log, replay, reference))
  np.testing.assert_array_equal(replay.tokens, reference)  # the oracle ends on the reference
  assert np.all(replay.calls <= GEN) and np.any(replay.calls < GEN)
  for row in range(ROWS):
    _, calls, _, rows = _reference(denoise, params, np.asarray(prompts[row]), "oracle", False,
                                   oracle_ref=reference[row])
    assert calls == replay.calls[row]
    for step, (conf, labels, weights) in enumerate(rows):
      np.testing.assert_allclose(log.confidences[step, row], conf, rtol=1e-5)
      np.testing.assert_array_equal(log.weights[step, row], weights)
      np.testing.assert_array_equal(log.labels[step, row][weights], labels[weights])
    assert not log.weights[len(rows):, row].any()  # steps after the row finished weigh nothing


def test_bad_decoder_settings_are_errors():
  denoise, params = _denoiser()
  with pytest.raises(ValueError, match="unknown decoding rule"):
    decoding.Decoder("greedy")
  with pytest.raises(ValueError, match="steps_per_block"):
    decoding.decode(denoise, params, _prompts(), gen_len=GEN, block_len=BLOCK,
                    decoder=decoding.Decoder("fixed_steps", steps_per_block=5))
  with pytest.raises(ValueError, match="multiple of block_len"):
    decoding.decode(denoise, params, _prompts(), gen_len=GEN + 1, block_len=BLOCK, decoder=decoding.Decoder())
  with pytest.raises(ValueError, match="filter"):
    decoding.decode(denoise, params, _prompts(), gen_len=GEN, block_len=BLOCK, decoder=decoding.Decoder("learn2pd"))
