"""The exercise checks hold in every dtype: a reference solution passes in float32 and bfloat16."""

import pytest
import torch

import tvlab
from tvlab import exercises


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_solutions_pass_the_model_checks_in_every_dtype(dtype, capsys, solutions):
    lm = tvlab.tiny_model("gemma3_text")
    lm.model.to(dtype)
    assert exercises.check_top_token(solutions.top_token, lm)
    assert exercises.check_extract_theta(solutions.extract_theta, lm)
    assert exercises.check_patched_prediction(solutions.patched_prediction, lm)
    assert exercises.check_add_patch(solutions.add_patch, lm)
    assert "FAIL" not in capsys.readouterr().out


def test_bfloat16_theta_one_rounding_step_off_still_passes(capsys):
    """The case seen on Binder: a θ from another code path, off by about one bfloat16 step (0.016 at |θ| ~ 6)."""
    lm = tvlab.tiny_model("gemma3_text")
    lm.model.to(torch.bfloat16)
    task = tvlab.get_task("antonyms")
    want = exercises._plain_theta(lm, task.pairs[:5], task.pairs[5:7], 2)
    signs = torch.sign(torch.randn(want.shape, generator=torch.Generator().manual_seed(0)))
    step = 2 ** -7 * 2 ** torch.floor(torch.log2(want.abs().max()))  # one bfloat16 step at the largest entry
    near, wrong = want + step * signs, want + 0.2 * want.abs().max() * signs
    assert not torch.allclose(near, want, atol=1e-3, rtol=1e-3)  # the old float32 tolerance said FAIL here
    assert exercises.check_extract_theta(lambda lm, d, x, layer: near, lm, layer=2)
    assert not exercises.check_extract_theta(lambda lm, d, x, layer: wrong, lm, layer=2)
