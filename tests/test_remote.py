"""The nnsight backend gives the engine's predictions and hidden states, in few requests; its errors say what to do.

Everything runs locally (nnsight on tiny random models, and once on the bundled Gemma 3 270M);
the NDIF boundary (nnsight's status call and its remote backend) is mocked: no test touches the network.
"""

import sys

import pandas as pd
import pytest
import torch

import tvlab
from tvlab import remote
from tvlab.engine import ForwardStats, generate_greedy, predict_last, predict_last_plain
from tvlab.models import ModelError
from tvlab.prompts import FORMATS, tokenize

nnsight = pytest.importorskip("nnsight")

FAMILIES = ["llama", "gemma3_text", "gpt2", "gpt_neox", "gptj", "qwen2", "phi", "opt"]


def _prompts(lm, n_sets=3):
    """ICL prompts (5 demonstrations) and zero-shot prompts: token ids of different lengths."""
    task, fmt = tvlab.get_task("antonyms"), FORMATS["paper"]
    sets = tvlab.sample_sets(task, n_sets, 5, seed=1, n_dummies=1)
    icl = [tokenize(lm.tokenizer, fmt, s.demos, s.query.input).ids for s in sets]
    zero = [tokenize(lm.tokenizer, fmt, (), s.query.input).ids for s in sets]
    return icl + zero


def _pair(model_type="llama"):
    """The same tiny model twice (same seed): tvlab's engine, and the nnsight backend."""
    return tvlab.tiny_model(model_type), remote.load_remote_model(f"tiny-{model_type}")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_predictions_reads_and_patches_equal_the_engine(model_type):
    engine, traced = _pair(model_type)
    prompts = _prompts(engine)
    g = torch.Generator().manual_seed(0)
    n, d = len(prompts), engine.d_model
    patches = [None, (1, torch.randn(d, generator=g) * 3), [(0, torch.randn(d, generator=g)), (3, torch.randn(d, generator=g) * 2)],
               (2, torch.randn(d, generator=g) * 3), None, [(1, torch.randn(d, generator=g)), (2, torch.randn(d, generator=g))]]
    assert len(patches) == n
    for mode in ("replace", "add"):
        want = predict_last(engine, prompts, patches=patches, mode=mode, read=True, logits=True)
        got = predict_last(traced, prompts, patches=patches, mode=mode, read=True, logits=True, batch_size=4)
        assert torch.equal(got.top_ids, want.top_ids)
        assert got.hidden.dtype == torch.float32 and got.hidden.shape == (n, engine.n_layers, d)
        torch.testing.assert_close(got.hidden, want.hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    # The plain path (no patches, no reads) and predict_last_plain go through the backend too.
    assert torch.equal(predict_last(traced, prompts).top_ids, predict_last(engine, prompts).top_ids)
    assert torch.equal(predict_last_plain(traced, prompts).top_ids, predict_last_plain(engine, prompts).top_ids)


def test_reads_and_patches_before_the_last_token_equal_the_engine():
    engine, traced = _pair()
    prompts = _prompts(engine)
    g = torch.Generator().manual_seed(1)
    patches = [(layer % engine.n_layers, torch.randn(engine.d_model, generator=g) * 3, -1 - layer % 3)
               for layer in range(len(prompts))]
    for mode in ("replace", "add"):
        for read_position in (-1, -2, -4):
            want = predict_last(engine, prompts, patches=patches, mode=mode, read=True, read_position=read_position)
            got = predict_last(traced, prompts, patches=patches, mode=mode, read=True, read_position=read_position)
            assert torch.equal(got.top_ids, want.top_ids)
            torch.testing.assert_close(got.hidden, want.hidden, atol=1e-5, rtol=1e-5)


def test_reads_see_the_state_before_that_blocks_patch():
    _, traced = _pair()
    prompt = _prompts(traced)[:1]
    theta = torch.full((traced.d_model,), 7.0)
    plain = predict_last(traced, prompt, read=True).hidden[0]
    patched = predict_last(traced, prompt, patches=[(2, theta)], read=True).hidden[0]
    torch.testing.assert_close(patched[:3], plain[:3])          # blocks 0-2: as before (the read precedes the patch)
    assert not torch.allclose(patched[3], plain[3])             # block 3 reads the patched state


def test_greedy_generation_equals_the_engine():
    engine, traced = _pair()
    prompt = _prompts(engine)[0]
    theta = torch.randn(engine.d_model, generator=torch.Generator().manual_seed(2)) * 4
    for patches, mode in (((), "replace"), ([(2, theta)], "replace"), ([(1, theta), (3, theta, -2)], "add")):
        want = generate_greedy(engine, prompt, patches=patches, mode=mode, max_new_tokens=6, stop=None)
        assert generate_greedy(traced, prompt, patches=patches, mode=mode, max_new_tokens=6, stop=None) == want
    assert traced.backend.log.requests == 3          # one request per continuation


def _task_vectors_both(engine, traced, config, n_sets):
    """ICL predictions and θ of the same antonyms sets through the engine and through nnsight."""
    fmt = tvlab.experiments.prompt_format(engine, config)
    task, _ = tvlab.prepare_task(engine, "antonyms", config)
    sets = tvlab.sample_sets(task, n_sets, 5, seed=3, n_dummies=2)
    return fmt, sets, tvlab.icl_and_task_vectors(engine, sets, fmt), tvlab.icl_and_task_vectors(traced, sets, fmt)


def test_task_vectors_and_run_task_equal_the_engine():
    engine, traced = _pair()
    config = tvlab.ExperimentConfig(n_test=6, n_dev=5, n_baseline=6)
    _, _, (icl_e, theta_e), (icl_t, theta_t) = _task_vectors_both(engine, traced, config, 4)
    assert icl_t == icl_e
    torch.testing.assert_close(theta_t, theta_e, atol=1e-5, rtol=1e-5)
    want = tvlab.run_task(engine, "antonyms", config)
    got = tvlab.run_task(traced, "antonyms", config)
    pd.testing.assert_frame_equal(got.predictions, want.predictions)
    assert got.best_layer == want.best_layer


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_logit_lens_through_the_backend_equals_the_engine(model_type):
    engine, traced = _pair(model_type)
    vector = torch.randn(engine.d_model, generator=torch.Generator().manual_seed(5)) * 3
    want = tvlab.inspect_vectors.vocab_logits(engine, vector)
    torch.testing.assert_close(tvlab.inspect_vectors.vocab_logits(traced, vector), want, atol=1e-5, rtol=1e-5)
    assert traced.backend.log.requests == 1
    assert tvlab.inspect_vectors.top_tokens(traced, vector)["token"].tolist() == \
        tvlab.inspect_vectors.top_tokens(engine, vector)["token"].tolist()


@pytest.mark.parametrize("n_test", [3, 20])
def test_requests_per_task_do_not_grow_with_the_sets(n_test):
    _, traced = _pair()
    config = tvlab.ExperimentConfig(n_test=n_test, n_dev=n_test, n_baseline=n_test)
    stats = ForwardStats()
    tvlab.run_task(traced, "antonyms", config, stats=stats)
    log = traced.backend.log
    # dev and test sets with the baseline, the dev layer sweep (every layer in one trace), test TV at the best layer
    assert log.requests == 3
    assert log.traces == stats.forwards == 3       # batch_size 256 holds each call's prompts
    assert log.bytes_sent > 0 and log.bytes_saved > 0
    assert "3 nnsight requests" in str(log)


def test_requests_survive_serialization_without_tvlab():
    """nnsight's dry run of the remote path: each request is serialized and run with tvlab's modules hidden, as on NDIF."""
    engine, traced = _pair()
    traced.backend.remote = "local"
    prompts = _prompts(engine)
    v = torch.randn(engine.d_model, generator=torch.Generator().manual_seed(4)) * 3
    patches = [None, (1, v), (2, v, -2), None, (3, v), None]
    want = predict_last(engine, prompts, patches=patches, mode="add", read=True, logits=True)
    got = predict_last(traced, prompts, patches=patches, mode="add", read=True, logits=True, batch_size=4)
    assert torch.equal(got.top_ids, want.top_ids)
    torch.testing.assert_close(got.hidden, want.hidden, atol=1e-5, rtol=1e-5)
    assert generate_greedy(traced, prompts[0], patches=[(2, v)], stop=None) == \
        generate_greedy(engine, prompts[0], patches=[(2, v)], stop=None)
    config = tvlab.ExperimentConfig(n_test=4, n_dev=3, n_baseline=4)
    pd.testing.assert_frame_equal(tvlab.run_task(traced, "antonyms", config).predictions,
                                  tvlab.run_task(engine, "antonyms", config).predictions)


def test_batch_size_sets_the_traces_of_one_request():
    engine, traced = _pair()
    prompts = _prompts(engine, n_sets=5)   # 10 prompts
    stats = ForwardStats()
    got = predict_last(traced, prompts, batch_size=3, stats=stats, read=True)
    assert (traced.backend.log.requests, traced.backend.log.traces, stats.forwards) == (1, 4, 4)
    assert stats.tokens == sum(len(p) for p in prompts) and stats.logit_rows == len(prompts)
    torch.testing.assert_close(got.hidden, predict_last(engine, prompts, read=True).hidden, atol=1e-5, rtol=1e-5)


def test_progress_bar_ticks_once_per_request(capsys):
    engine, traced = _pair()
    traced.backend.progress = True
    prompts = _prompts(engine)
    predict_last(traced, prompts, batch_size=2)
    predict_last(traced, prompts, read=True)
    assert traced.backend._bar.n == 2 == traced.backend.log.requests
    assert "nnsight requests" in capsys.readouterr().err


def test_bad_arguments_are_the_engines_errors():
    _, traced = _pair()
    prompts = _prompts(traced)[:2]
    v = torch.zeros(traced.d_model)
    with pytest.raises(ValueError, match="two patches at layer 1"):
        predict_last(traced, prompts, patches=[[(1, v), (1, v)], None])
    with pytest.raises(ValueError, match="out of range"):
        predict_last(traced, prompts, patches=[(9, v), None])
    with pytest.raises(ValueError, match="mode must be"):
        predict_last(traced, prompts, patches=[(1, v), None], mode="mix")
    with pytest.raises(ValueError, match="hidden size"):
        predict_last(traced, prompts, patches=[(1, torch.zeros(3)), None])
    with pytest.raises(IndexError, match="not in the prompt"):
        predict_last(traced, prompts, read=True, read_position=-500)
    assert traced.backend.log.requests == 0   # all refused before a request


def test_load_model_routes_to_the_backend_and_checks_its_arguments():
    lm = tvlab.load_model("tiny-llama", backend="nnsight")
    assert isinstance(lm.backend, remote.NNsightBackend) and not lm.backend.remote
    assert tvlab.load_model("tiny-llama", backend="tvlab").backend is None
    with pytest.raises(ValueError, match="backend='nnsight'"):
        tvlab.load_model("tiny-llama", remote=True)
    with pytest.raises(ValueError, match="unknown backend"):
        tvlab.load_model("tiny-llama", backend="vllm")


def test_wrapping_leaves_the_engine_model_as_it_was():
    engine = tvlab.tiny_model("llama")
    prompts = _prompts(engine)
    before = predict_last(engine, prompts, read=True)
    traced = remote.with_nnsight(engine)
    after = predict_last(engine, prompts, read=True)
    assert engine.backend is None and traced.model is engine.model
    assert torch.equal(after.top_ids, before.top_ids) and torch.equal(after.hidden, before.hidden)


# ---------------------------------------------------------------------------- errors that say what to do

def test_missing_nnsight_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "nnsight", None)  # import nnsight -> ImportError
    with pytest.raises(ModelError, match=r'pip install "tvlab\[remote\]"'):
        tvlab.load_model("tiny-llama", backend="nnsight")


@pytest.fixture
def ndif(monkeypatch):
    """NDIF's status endpoint, mocked: ``ndif(deployments)`` or ``ndif(error)``; records the calls."""
    from nnsight import ndif as nnsight_ndif

    calls = []

    def install(answer):
        def fake_get(path, *args, **kwargs):
            calls.append(path)
            if isinstance(answer, Exception):
                raise answer
            return {"deployments": answer}
        monkeypatch.setattr(nnsight_ndif, "_get", fake_get)
        return calls

    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)   # tvlab copies a key from the environment there
    install(AssertionError("no test may reach NDIF"))
    return install


def test_remote_without_an_api_key_says_where_to_get_one(ndif, monkeypatch):
    calls = ndif(AssertionError("the key is checked before any network call"))
    monkeypatch.delenv("NDIF_API_KEY")
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    with pytest.raises(ModelError, match="login.ndif.us") as e:
        tvlab.load_model("meta-llama/Llama-3.1-70B", backend="nnsight", remote=True)
    assert "NDIF_API_KEY" in str(e.value) and calls == []


def test_remote_when_ndif_cannot_be_reached(ndif):
    import httpx

    calls = ndif(httpx.ConnectError("[Errno -3] Temporary failure in name resolution"))
    with pytest.raises(ModelError, match="cannot reach NDIF"):
        tvlab.load_model("meta-llama/Llama-3.1-70B", backend="nnsight", remote=True)
    assert calls == ["/status"]


def test_remote_model_that_ndif_does_not_host(ndif):
    ndif({"a": {"repo_id": "meta-llama/Llama-3.1-70B", "deployment_level": "HOT", "application_state": "RUNNING"},
          "b": {"repo_id": "some/cold-model", "deployment_level": "COLD"}})
    with pytest.raises(ModelError, match="does not host 'EleutherAI/pythia-70m'") as e:
        tvlab.load_model("EleutherAI/pythia-70m", backend="nnsight", remote=True)
    assert "meta-llama/Llama-3.1-70B" in str(e.value) and "cold-model" not in str(e.value)


@pytest.mark.parametrize("name", [None, "tiny-llama"])
def test_remote_needs_a_hosted_model_id(ndif, name):
    with pytest.raises(ModelError, match="only the models it hosts"):
        tvlab.load_model(name, backend="nnsight", remote=True)


def test_remote_refuses_local_loading_options(ndif):
    with pytest.raises(ValueError, match="NDIF decides"):
        remote.load_remote_model("meta-llama/Llama-3.1-70B", remote=True, dtype="bfloat16")


def test_a_failed_request_is_a_clear_error(monkeypatch):
    """A network failure during a request (mocked at nnsight's remote backend) becomes a ModelError."""
    import httpx
    from nnsight.intervention.backends.remote import RemoteBackend

    def unreachable(self, tracer=None):
        raise httpx.ConnectError("connection refused")

    monkeypatch.setattr(RemoteBackend, "__call__", unreachable)
    lm = remote.load_remote_model("tiny-llama")
    lm.backend.remote = True
    monkeypatch.setattr(lm.backend.model, "to_model_key", lambda: "nnsight.modeling.transformers.TransformersModel:{}")
    with pytest.raises(ModelError, match="the NDIF request failed: connection refused"):
        predict_last(lm, _prompts(lm)[:2])
    assert lm.backend.log.requests == 0


# ---------------------------------------------------------------------------- the CLI

def test_cli_backend_nnsight_gives_the_engines_results(tmp_path, capsys):
    from tvlab.cli import main

    args = ["reproduce", "--model", "tiny-llama", "--tasks", "antonyms", "--n-test", "4", "--n-dev", "3",
            "--n-baseline", "4", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "engine")]) == 0
    capsys.readouterr()
    assert main(args + ["--backend", "nnsight", "--out", str(tmp_path / "nnsight")]) == 0
    assert "3 nnsight requests" in capsys.readouterr().err
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "nnsight" / "predictions.csv"),
                                  pd.read_csv(tmp_path / "engine" / "predictions.csv"))


def test_cli_remote_without_a_key_fails_before_any_work(ndif, monkeypatch, capsys, tmp_path):
    from tvlab.cli import main

    monkeypatch.delenv("NDIF_API_KEY")
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    assert main(["reproduce", "--model", "meta-llama/Llama-3.1-70B", "--backend", "nnsight", "--remote",
                 "--tasks", "antonyms", "--out", str(tmp_path)]) == 2
    assert "login.ndif.us" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the real model

@pytest.mark.model
def test_bundled_model_through_nnsight_equals_the_engine(gemma):
    traced = remote.with_nnsight(gemma)
    config = tvlab.ExperimentConfig(n_test=4, n_dev=3, n_baseline=4)
    fmt, sets, (icl_e, theta_e), (icl_t, theta_t) = _task_vectors_both(gemma, traced, config, 3)
    assert icl_t == icl_e
    # Gemma's residual stream reaches ~4e4, so float32 rounding alone moves entries by ~1e-2: compare each θ's
    # error to its norm (measured: 6e-7, like the engine's own shared-prefix path against its plain path, 4e-7).
    assert ((theta_t - theta_e).norm(dim=-1) / theta_e.norm(dim=-1)).max() < 1e-5
    queries = [s.query for s in sets]
    sweep_e = tvlab.zero_shot_predictions(gemma, queries, fmt, thetas=theta_e)
    assert torch.equal(tvlab.zero_shot_predictions(traced, queries, fmt, thetas=theta_e), sweep_e)
    pd.testing.assert_frame_equal(tvlab.run_task(traced, "antonyms", config).predictions,
                                  tvlab.run_task(gemma, "antonyms", config).predictions)


def test_rows_not_read_are_not_sent_back():
    plain, traced = _pair()
    prompts = [plain.tokenizer(t).input_ids for t in ("example:hot->cold\nexample:big->", "example:up->", "example:big->")]
    want = [True, False, True]
    got = predict_last(traced, prompts, read=want)
    ref = predict_last(plain, prompts, read=want)
    assert torch.equal(got.top_ids, ref.top_ids)
    torch.testing.assert_close(got.hidden, ref.hidden, atol=1e-5, rtol=1e-5)
    assert not got.hidden[1].any() and got.hidden[0].any()
    everything = traced.backend.log.bytes_saved
    predict_last(traced, prompts, read=True)
    assert traced.backend.log.bytes_saved - everything > everything  # reading all three returns more
