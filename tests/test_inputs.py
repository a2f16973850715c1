"""Token batches: padding on either side, the predicted position, and clear input errors."""

from __future__ import annotations

import inspect

import pytest
import torch

from strace_lens.inputs import tokenize


def test_unpadded_tensor(tiny, tiny_tokens):
    batch = tokenize(tiny, tiny_tokens)
    assert torch.equal(batch.tokens, tiny_tokens)
    assert batch.attention_mask.sum() == 36 and batch.predict_pos.tolist() == [8] * 4
    assert not batch.is_padded and not batch.has_left_padding and batch.model_kwargs() == {}
    one = tokenize(tiny, tiny_tokens[0])  # a 1-d tensor is one prompt
    assert one.tokens.shape == (1, 9)


def test_right_and_left_padding(tiny):
    # right padding: no attention mask needed (causal), predicted position = last real token
    attention = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    tokens = torch.arange(10).reshape(2, 5)
    model = tiny
    right = tokenize(model, tokens, attention)
    assert right.predict_pos.tolist() == [2, 4]
    assert right.is_padded and not right.has_left_padding and right.model_kwargs() == {}
    left = tokenize(model, tokens, attention.flip(-1))
    assert left.predict_pos.tolist() == [4, 4]
    assert left.has_left_padding
    assert torch.equal(left.model_kwargs()["attention_mask"], attention.flip(-1))
    assert left.real_positions[0].tolist() == [0, 0, 0, 1, 2]
    # an interior gap counts as left padding too (a real token follows padding)
    gap = tokenize(model, tokens, torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 1, 1]]))
    assert gap.has_left_padding and gap.predict_pos.tolist() == [3, 4]


def test_select_trim_repeat(tiny):
    tokens = torch.arange(12).reshape(3, 4)
    attention = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 0]])
    batch = tokenize(tiny, tokens, attention)
    sub = batch.select([0, 2]).trimmed()
    assert sub.tokens.tolist() == [[1, 2], [9, 10]]
    assert sub.predict_pos.tolist() == [1, 1]
    assert torch.equal(sub.attention_mask, torch.tensor([[1, 1], [0, 1]]))
    rep = batch.repeat_interleave(2)
    assert rep.batch_size == 6 and rep.predict_pos.tolist() == [2, 2, 3, 3, 2, 2]


@pytest.mark.parametrize(
    ("tokens", "attention", "error", "match"),
    [
        (torch.ones(2, 3), None, TypeError, "integer tensor"),
        (torch.ones(2, 0, dtype=torch.long), None, ValueError, r"\[batch, pos\]"),
        (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4), ValueError, "must match"),
        (torch.ones(2, 3, dtype=torch.long), torch.full((2, 3), 2), ValueError, "only 0"),
        (
            torch.ones(2, 3, dtype=torch.long),
            torch.tensor([[1, 1, 1], [0, 0, 0]]),
            ValueError,
            "Row 1 .* all padding",
        ),
        (torch.ones(1, 65, dtype=torch.long), None, ValueError, "context of 64"),
    ],
)
def test_tensor_errors(tiny, tokens, attention, error, match):
    with pytest.raises(error, match=match):
        tokenize(tiny, tokens, attention)


def test_padding_beyond_context_is_fine_if_real_tokens_fit(tiny):
    attention = torch.zeros(1, 70, dtype=torch.long)
    attention[0, :10] = 1
    assert tokenize(tiny, torch.ones(1, 70, dtype=torch.long), attention).predict_pos.item() == 9


def test_string_errors(tiny):
    with pytest.raises(ValueError, match="prompt list is empty"):
        tokenize(tiny, [])
    with pytest.raises(ValueError, match="Prompt 2 is empty"):
        tokenize(tiny, ["a", "b", ""])
    # the run-time type checker of the tests samples one element of a list, so it may or may
    # not stop ["a", 3] first; the message users get is tokenize's own
    with pytest.raises(TypeError, match="Prompt 1 is a int"):
        inspect.unwrap(tokenize)(tiny, ["a", 3])
    with pytest.raises(ValueError, match="only accepted with a token tensor"):
        tokenize(tiny, ["a"], torch.ones(1, 1))
