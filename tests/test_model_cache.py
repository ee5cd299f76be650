"""The offline model cache: stale work folders, cheap checks on load, and what a failed load may do."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import tvlab
from tvlab import models

ROOT_NAME = "gemma-3-270m-q4_k_m"


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TVLAB_CACHE", str(tmp_path))
    return tmp_path / "models"


def _work_folder(root: Path, name: str, age_s: float = 3600) -> Path:
    folder = root / name
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(b"half a model")
    past = time.time() - age_s
    os.utime(folder, (past, past))
    return folder


# --------------------------------------------------------------------------- stale work folders

def test_work_folders_of_killed_conversions_are_removed_under_the_lock(cache, monkeypatch, fake_conversion):
    calls = []
    fake_conversion(calls)
    cache.mkdir(parents=True)
    killed = _work_folder(cache, f".convert-{ROOT_NAME}.ab3_x9zq")             # a conversion killed an hour ago
    other_model = _work_folder(cache, f".convert-{ROOT_NAME}-bfloat16.k2j4m8pq")  # another lock's work
    legacy = _work_folder(cache, ".convert-yohygd9f")                          # tvlab <= 0.1 named no model
    unrelated = _work_folder(cache, ".convert-notes")                          # not a name tvlab makes
    path = models.default_model_path()
    assert len(calls) == 1 and models._cache_is_complete(path)
    assert not killed.exists() and not legacy.exists()
    assert other_model.exists() and unrelated.exists()
    assert models.default_model_path() == path and len(calls) == 1  # also removed when nothing is converted


def test_a_work_folder_newer_than_the_lock_is_left_alone(cache, monkeypatch, fake_conversion):
    fake_conversion()
    cache.mkdir(parents=True)
    newer = _work_folder(cache, f".convert-{ROOT_NAME}.zzzzzzzz", age_s=-3600)  # made after the lock was taken
    models.default_model_path()
    assert newer.exists()


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from filelock import FileLock
    with FileLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
""")


def _hold(lock: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(lock)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_running_conversion_of_another_model_keeps_its_work_folder(cache, monkeypatch, fake_conversion):
    """SmolLM2 converting in another process (its lock held, an unnamed work folder of an old tvlab): untouched."""
    fake_conversion()
    cache.mkdir(parents=True)
    running = _work_folder(cache, ".convert-runnin_1")
    proc = _hold(cache / ".smollm2-135m.lock")
    try:
        models.default_model_path()
        assert running.exists()
    finally:
        proc.communicate("\n", timeout=30)
    models.default_model_path()
    assert not running.exists()  # nobody converts any more: stale


# --------------------------------------------------------------------------- cheap checks, full verification

def test_loading_checks_sizes_only_and_verify_checks_everything(cache, monkeypatch, fake_conversion):
    calls = []
    fake_conversion(calls)
    path = models.default_model_path()
    hashed = []
    real_sha256 = models._sha256
    monkeypatch.setattr(models, "_sha256", lambda p: hashed.append(p.name) or real_sha256(p))
    assert models.default_model_path() == path and hashed == []  # no re-hashing of a 1 GB file on load

    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    weights.write_bytes(b"W" * weights.stat().st_size)  # same size, other bytes ...
    os.utime(weights, ns=(stamp, stamp))                 # ... and the old time: only a full check sees it
    assert models.default_model_path() == path and len(calls) == 1
    assert models.default_model_path(verify=True) == path and "model.safetensors" in hashed
    assert len(calls) == 2 and models._cache_is_complete(path, verify=True)  # converted again

    hashed.clear()
    models.default_model_path(rebuild=True)
    assert len(calls) == 3


def test_a_file_changed_in_place_is_caught_without_verify(cache, monkeypatch, fake_conversion):
    calls = []
    fake_conversion(calls)
    path = models.default_model_path()
    weights = path / "model.safetensors"
    weights.write_bytes(b"W" * weights.stat().st_size)  # same size, rewritten later:
    later = time.time_ns() + 60 * 10**9
    os.utime(weights, ns=(later, later))
    models.default_model_path()
    assert len(calls) == 2


def test_times_kept_to_the_second_do_not_count_as_changes(cache, monkeypatch, fake_conversion):
    """An image layer or archive may keep modification times to the second only: no re-hashing for that."""
    fake_conversion()
    path = models.default_model_path()
    for file in path.iterdir():
        whole = file.stat().st_mtime_ns // 10**9 * 10**9
        os.utime(file, ns=(whole, whole))
    monkeypatch.setattr(models, "_sha256", lambda p: pytest.fail("hashed again"))
    assert models._cache_is_complete(path)


def test_a_copied_cache_is_hashed_once_then_trusted(cache, monkeypatch, fake_conversion):
    """A manifest from an older tvlab (no times) or a copied folder (new times): one full check, then cheap."""
    calls = []
    fake_conversion(calls)
    path = models.default_model_path()
    manifest = json.loads((path / "tvlab-manifest.json").read_text())
    del manifest["mtimes"]
    (path / "tvlab-manifest.json").write_text(json.dumps(manifest))
    hashed = []
    real_sha256 = models._sha256
    monkeypatch.setattr(models, "_sha256", lambda p: hashed.append(p.name) or real_sha256(p))
    models.default_model_path()
    assert len(calls) == 1 and "model.safetensors" in hashed
    hashed.clear()
    models.default_model_path()
    assert hashed == [] and len(calls) == 1


# --------------------------------------------------------------------------- a cache that does not load

def test_a_load_error_of_a_current_cache_is_raised_without_reconverting(cache, monkeypatch, fake_conversion):
    calls = []
    fake_conversion(calls, real=True)
    tvlab.load_model()
    assert len(calls) == 1

    def broken(source, kwargs):
        raise RuntimeError("not enough memory: you tried to allocate 4 GB")

    monkeypatch.setattr(models, "_from_pretrained", broken)
    with pytest.raises(RuntimeError, match="not enough memory"):
        tvlab.load_model()
    assert len(calls) == 1  # a minute-long conversion would not have helped


def _mark_foreign(folder: Path) -> None:
    manifest = json.loads((folder / "tvlab-manifest.json").read_text())
    manifest["transformers"] = "4.0.0"
    (folder / "tvlab-manifest.json").write_text(json.dumps(manifest))


_HOLD_AND_WATCH = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from filelock import FileLock
    lock, copy = sys.argv[1], Path(sys.argv[2])
    manifest = (copy / "tvlab-manifest.json").read_text()
    with FileLock(lock):
        print("locked", flush=True)
        intact = True
        for _ in range(30):  # 3 s: the other process rebuilds the original meanwhile, then waits for this lock
            time.sleep(0.1)
            try:
                intact &= (copy / "tvlab-manifest.json").read_text() == manifest
            except OSError:
                intact = False
        print("intact" if intact else "changed while locked", flush=True)
""")


def test_a_cache_from_another_transformers_is_converted_again_each_part_under_its_lock(cache, monkeypatch, fake_conversion):
    calls = []
    fake_conversion(calls, real=True)
    assert tvlab.load_model(dtype="bfloat16").dtype == torch.bfloat16
    original, copy = cache / ROOT_NAME, cache / f"{ROOT_NAME}-bfloat16"
    _mark_foreign(original)
    _mark_foreign(copy)
    real_from_pretrained = models._from_pretrained
    watcher = []

    def fails_once(source, kwargs):
        if not watcher:  # this transformers cannot read what "4.0.0" wrote; meanwhile a process holds the copy's lock
            watcher.append(subprocess.Popen([sys.executable, "-c", _HOLD_AND_WATCH, str(cache / ".gemma-3-270m-bfloat16.lock"),
                                             str(copy)], stdout=subprocess.PIPE, text=True))
            assert watcher[0].stdout.readline().strip() == "locked"
            raise ValueError("The checkpoint you are trying to load has model type `gemma9`")
        return real_from_pretrained(source, kwargs)

    monkeypatch.setattr(models, "_from_pretrained", fails_once)
    lm = tvlab.load_model(dtype="bfloat16")
    assert watcher[0].communicate(timeout=60)[0].strip() == "intact"  # the copy was not touched without its lock
    assert lm.dtype == torch.bfloat16 and len(calls) == 2
    assert not models._written_by_another_transformers(original) and not models._written_by_another_transformers(copy)
    assert not [p for p in cache.iterdir() if p.name.startswith(".convert")]


def test_only_the_part_from_another_transformers_is_converted_again(cache, monkeypatch, fake_conversion):
    calls = []
    fake_conversion(calls, real=True)
    tvlab.load_model(dtype="bfloat16")
    copy = cache / f"{ROOT_NAME}-bfloat16"
    _mark_foreign(copy)
    stamp = (cache / ROOT_NAME / "tvlab-manifest.json").stat().st_mtime_ns
    real_from_pretrained = models._from_pretrained
    failed = []

    def fails_once(source, kwargs):
        if not failed:
            failed.append(source)
            raise KeyError("rope_parameters")
        return real_from_pretrained(source, kwargs)

    monkeypatch.setattr(models, "_from_pretrained", fails_once)
    assert tvlab.load_model(dtype="bfloat16").dtype == torch.bfloat16
    assert failed == [copy] and len(calls) == 1  # the float32 original was fine: not converted again
    assert (cache / ROOT_NAME / "tvlab-manifest.json").stat().st_mtime_ns == stamp
    assert not models._written_by_another_transformers(copy)


def test_bfloat16_weights_with_float32_products_read_the_bfloat16_copy(cache, monkeypatch, fake_conversion):
    """Binder on a CPU without native bfloat16: TVLAB_DTYPE=auto picks float32, TVLAB_WEIGHTS_DTYPE=bfloat16 keeps
    the memory-mapped weights at half the size."""
    fake_conversion(real=True)
    monkeypatch.setattr(models, "cpu_bfloat16_is_fast", lambda: False)
    monkeypatch.setenv("TVLAB_DTYPE", "auto")
    monkeypatch.setenv("TVLAB_WEIGHTS_DTYPE", "bfloat16")
    loaded = []
    real_from_pretrained = models._from_pretrained
    monkeypatch.setattr(models, "_from_pretrained", lambda source, kwargs: loaded.append(Path(source).name)
                        or real_from_pretrained(source, kwargs))
    lm = tvlab.load_model(device="cpu")
    assert (lm.dtype, lm.weights_dtype) == (torch.float32, torch.bfloat16)
    assert loaded[-1] == f"{ROOT_NAME}-bfloat16"


def test_a_read_only_cache_stays_valid(cache, monkeypatch, fake_conversion):
    calls = []
    fake_conversion(calls)
    path = models.default_model_path()
    later = time.time_ns() + 60 * 10**9
    os.utime(path / "config.json", ns=(later, later))  # e.g. copied without its times

    def read_only(path, data):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(models, "_write_json_atomically", read_only)
    assert models.default_model_path() == path and len(calls) == 1  # hashed, found intact, not converted again
