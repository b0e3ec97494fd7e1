"""Sequences as the LM should see them: left padding masked out of attention with positions
that start at the first real token, and a loss over the answer up to its first <eos>."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_grid

from tokenscale.config import parse_grid
from tokenscale.workers.benchmarks import EOS, TOKEN_ID, generate
from tokenscale.workers.model import VLM, positions

PAD = TOKEN_ID["<pad>"]


def _model(compressor: str, attention: str = "sdpa") -> VLM:
    raw = tiny_grid("seq", llms=1, visual_tokens=(4,), compressors=[compressor])
    raw["vision"]["token_norm"] = "none"
    raw["train"]["attention"] = attention
    torch.manual_seed(0)
    return VLM(parse_grid(raw).trials()[0]).eval()


@pytest.mark.parametrize("compressor", ["avgpool", "quecc"])  # quecc also runs the LM over the question
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_left_padding_changes_nothing(compressor, attention):
    model = _model(compressor, attention)
    image = torch.randn(1, 3, 16, 16)
    question = torch.tensor([[5, 6, 7]])
    answer = torch.tensor([[8, EOS, EOS]])
    answer_mask = torch.tensor([[1, 1, 0]])
    with torch.no_grad():
        loss, logits = model(image, question, answer, torch.ones_like(question), answer_mask)
        padded = torch.tensor([[PAD, PAD, PAD, 5, 6, 7]])
        padded_loss, padded_logits = model(image, padded, answer, torch.tensor([[0, 0, 0, 1, 1, 1]]), answer_mask)
        # without the mask the pads would be attended to and shift the positions
        unmasked_loss, _ = model(image, padded, answer, torch.ones_like(padded), answer_mask)
    assert torch.isfinite(padded_logits).all()
    torch.testing.assert_close(padded_logits[:, :2], logits[:, :2], rtol=0, atol=1e-5)
    assert padded_loss.item() == pytest.approx(loss.item(), abs=1e-6)
    assert abs(unmasked_loss.item() - loss.item()) > 1e-4, "the mask is what makes padding invisible"


def test_loss_covers_the_answer_up_to_its_first_eos():
    model = _model("avgpool")
    image = torch.randn(2, 3, 16, 16)
    question = torch.tensor([[5, 6, 7], [5, 9, 7]])
    answer = torch.tensor([[8, EOS, EOS, EOS], [8, 10, 11, EOS]])
    answer_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    with torch.no_grad():
        loss, logits = model(image, question, answer, torch.ones_like(question), answer_mask)
        per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), answer.flatten(), reduction="none").view(2, 4)
    expected = (per_token * answer_mask).sum() / answer_mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() != pytest.approx(per_token.mean().item(), rel=1e-3), "eos after eos is not trained on"


def test_split_masks_and_positions():
    split = generate("color", "eval", 8, 1234, 16)
    answers = split.answers
    mask = split.answer_mask()
    first_eos = (answers == split.eos_id).argmax(axis=1)
    for row, end in zip(mask, first_eos, strict=True):
        assert row[: end + 1].all() and not row[end + 1 :].any()
    padded = np.pad(split.questions, ((0, 0), (2, 0)), constant_values=split.pad_id)
    split.questions = padded
    assert (split.question_mask()[:, :2] == 0).all() and (split.question_mask()[:, 2:] == 1).all()
    assert positions(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2]]
    assert positions(torch.tensor([[1, 1, 0, 1]])).tolist() == [[0, 1, 1, 2]], "a pad in the middle does not shift what follows"


def test_a_checkpoint_lm_trains_in_train_mode_with_gradient_checkpointing(tmp_path):
    """from_pretrained hands back an eval-mode LM, where transformers skips gradient
    checkpointing: the trainer's model must be in train mode with checkpointing on."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tokenscale.config import LLMSpec
    from tokenscale.workers.train import _build_model

    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "lm")
    trial = parse_grid(tiny_grid("gc", llms=1, visual_tokens=(4,), train={"stage2_steps": 1, "gradient_checkpointing": True})).trials()[0]
    trial = trial.model_copy(update={"llm": LLMSpec(name="lm", path=str(tmp_path / "lm"))})
    model = _build_model(trial, torch.device("cpu"), torch.float32)
    assert model.training and model.llm.training
    assert model.llm.is_gradient_checkpointing
    assert all(layer.training for layer in model.llm.model.layers)
