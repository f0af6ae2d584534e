"""The evaluation cache: keys that follow what changes a score (not where a run's files are), and corrupt entries."""

from mlalign.config import EvalConfig
from mlalign.evaluation.cache import EvalCache, eval_identity, task_config_fingerprint
from mlalign.evaluation.harness import plan_benchmarks


def _plan(tmp_path, name, seed=0, **settings):
    return plan_benchmarks(["hi"], EvalConfig(suite="bundled", benchmarks=["arc_challenge", "mmlu"], **settings),
                           seed=seed, work_dir=tmp_path / name)


def test_key_ignores_the_run_folder_but_not_few_shot_limit_or_seed(tmp_path):
    one, two = _plan(tmp_path, "one"), _plan(tmp_path, "two")
    assert task_config_fingerprint(one.task_manager, "mlalign_arc_hi") == \
        task_config_fingerprint(two.task_manager, "mlalign_arc_hi")
    model = {"source": "m", "files": {}}
    same = eval_identity(model, None, one)
    assert same == eval_identity(model, None, two)
    for other in (_plan(tmp_path, "a", num_fewshot={"mmlu": 5}), _plan(tmp_path, "b", limit=3),
                  _plan(tmp_path, "c", seed=1)):
        assert eval_identity(model, None, other) != same
    assert eval_identity(model, "adapter-sha", one) != same
    assert eval_identity({"source": "m", "files": {"config.json": "x"}}, None, one) != same
    # Batch size changes no score: the same key.
    assert eval_identity(model, None, _plan(tmp_path, "d", batch_size="auto")) == same


def test_round_trip_copies_lm_eval_files_and_a_corrupt_entry_is_a_miss(tmp_path):
    cache = EvalCache(tmp_path / "cache")
    identity = {"model": "m", "tasks": [["t", 0, "abc"]]}
    files = tmp_path / "files"
    files.mkdir()
    (files / "results_1.json").write_text("{}")
    run = {"results": {"mmlu": {"hi": {"acc": 0.5}}}, "skipped": [], "settings": {}}
    assert cache.load(identity) is None
    folder = cache.save(identity, run, files_from=files)
    assert cache.load(identity, files_to=tmp_path / "copy") == run
    assert (tmp_path / "copy" / "results_1.json").is_file()
    assert EvalCache(tmp_path / "cache", enabled=False).load(identity) is None
    (folder / "run.json").write_text('{"results": {}}')
    assert cache.load(identity) is None
