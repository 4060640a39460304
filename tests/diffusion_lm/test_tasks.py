"""Reasoning-gym problems as rows: the documented layout, disjoint splits, the library's scorer."""
import numpy as np
import pytest

from jaxai.diffusion_lm import tasks


def test_a_row_is_the_padded_question_then_answer_and_end_of_text():
  row = tasks.encode_row("abc", "xy", prompt_len=5, gen_len=4)
  np.testing.assert_array_equal(row, [tasks.PAD, tasks.PAD, 97, 98, 99, 120, 121, tasks.EOT, tasks.EOT])
  prompt_only = tasks.encode_row("abc", None, prompt_len=5, gen_len=4)
  np.testing.assert_array_equal(prompt_only[5:], [tasks.MASK] * 4)
  assert tasks.encode_row("abcdef", "x", prompt_len=5, gen_len=4) is None  # question too long
  assert tasks.encode_row("abc", "wxyz", prompt_len=5, gen_len=4) is None  # no room for EOT
  assert tasks.decode_answer(row[5:]) == "xy"
  assert tasks.decode_answer(np.array([104, 105, tasks.MASK, tasks.EOT, 106])) == "hi"


def test_problems_interleave_tasks_keep_splits_disjoint_and_score_with_the_library():
  names = ("spell_backward", "chain_sum")
  heldout = tasks.make_problems(names, 30, "heldout", prompt_len=128, gen_len=16)
  train = tasks.make_problems(names, 200, "train", prompt_len=128, gen_len=16,
                              exclude={e["question"] for e in heldout.entries})
  assert heldout.tasks[:4] == ["spell_backward", "chain_sum"] * 2
  assert not {e["question"] for e in train.entries} & {e["question"] for e in heldout.entries}
  assert len(train) + train.dropped["in_heldout"] + train.dropped["too_long"] == 400
  for problems in (train, heldout):
    assert problems.tokens.shape == (len(problems), 144)
    for row, entry in zip(problems.tokens[:10], problems.entries[:10]):
      assert tasks.decode_answer(row[128:]) == entry["answer"]
      assert bytes(int(t) for t in row[:128] if t != tasks.PAD).decode() == entry["question"]
  answers = np.stack([tasks.encode_row(e["question"], e["answer"], 128, 16)[128:] for e in heldout.entries])
  assert tasks.solved(heldout, answers).all()
  wrong = answers.copy()
  wrong[:, 0] = ord("#")
  assert not tasks.solved(heldout, wrong).any()
  with pytest.raises(ValueError, match="unknown split"):
    tasks.make_problems(names, 1, "test", prompt_len=128, gen_len=16)
