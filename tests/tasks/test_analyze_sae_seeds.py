"""task=analyze sae.seeds=[...] on the testbed: the map under every SAE seed and its spread (analysis/sae_seeds.json),
equal to single-seed runs on each seed's folder, and the refusals before any work."""

import json
import shutil

import pytest

from tests.conftest import SMALL_TESTBED_OVERRIDES
from tests.helpers import run_cli

LAYERS = [2, 5]


def _common(tmp_path, testbed_cache_dir, cache: str = "cache") -> list[str]:
    """Overrides for the small testbed with this test's own analysis cache (`tmp_path/cache`, the testbed linked)."""
    (tmp_path / cache).mkdir(exist_ok=True)
    if not (tmp_path / cache / "testbed").exists():
        (tmp_path / cache / "testbed").symlink_to(testbed_cache_dir / "testbed")
    return ["model=testbed", f"paths.cache_dir={tmp_path / cache}", f"paths.root_dir={tmp_path}",
            *SMALL_TESTBED_OVERRIDES]


def identical_seeds(testbed_dir, directory, seeds=(0, 1)):
    """`directory/seed_<s>/layer_<L>/`: the testbed's own SAEs, the same bytes under every seed."""
    for seed in seeds:
        for layer in LAYERS:
            shutil.copytree(testbed_dir / "saes" / f"layer_{layer}", directory / f"seed_{seed}" / f"layer_{layer}")
    return directory


def _analyze(tmp_path, testbed_cache_dir, run_dir, *args, cache: str = "cache"):
    result = run_cli(["task=analyze", *_common(tmp_path, testbed_cache_dir, cache), "langs=[hi,zh]",
                      f"layers=[{','.join(map(str, LAYERS))}]", "data.max_sentences=16", "analysis.bootstrap=30",
                      "sae=local", *args, f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _json(path):
    return json.loads(path.read_text())


@pytest.mark.slow
def test_identical_seed_folders_have_zero_spread_and_each_seed_equals_a_single_seed_run(testbed_dir,
                                                                                        testbed_cache_dir, tmp_path):
    saes = identical_seeds(testbed_dir, tmp_path / "saes")
    seeded = _analyze(tmp_path, testbed_cache_dir, tmp_path / "seeds", f"sae.path_template={saes}",
                      "sae.seeds=[0,1]")
    analysis = tmp_path / "seeds" / "analysis"
    spread = _json(analysis / "sae_seeds.json")
    assert spread["seeds"] == [0, 1] and spread["langs"] == ["zh", "hi"] and spread["layers"] == LAYERS
    cells = [cell for by_layer in spread["cells"].values() for cell in by_layer.values()]
    assert len(cells) == 4 and all(cell["seed_sd"] == 0.0 and cell["sign_stable"] for cell in cells)
    # A cell where the small testbed's SAE does not fit (hi, layer 5 in one build) is left out of the counts.
    assert spread["n_cells"] + spread["n_cells_left_out"] == 4 and spread["n_cells"] >= 2
    assert spread["n_sign_stable"] == spread["n_cells"] and spread["sign_unstable"] == []
    assert f"{spread['n_cells']} of {spread['n_cells']} (language, layer) cells keep the sign" in seeded.stdout
    # Each seed: its own full analysis, computed (the folder is part of the cache key), on one model load.
    assert seeded.stdout.count("analyzing 3 language(s) x 2 layer(s): done in") == 2
    assert seeded.stdout.count("loading model testbed: done in") == 1
    for seed in (0, 1):
        for name in ("summary.json", "summary.md", "metrics.csv", "disparity_heatmap.png", "features.csv"):
            assert (analysis / f"sae_seed_{seed}" / name).is_file(), (seed, name)
    assert (analysis / "sae_seeds_heatmap.png").stat().st_size > 10_000
    assert "| hi |" in (analysis / "sae_seeds.md").read_text()
    assert not (analysis / "summary.json").exists()  # no single map to mistake for the seeds' one
    # A single-seed run on seed_1's folder (its own cache, so nothing is shared) gives seed 1's numbers exactly.
    _analyze(tmp_path, testbed_cache_dir, tmp_path / "single", f"sae.path_template={saes / 'seed_1'}",
             cache="cache_single")
    single = _json(tmp_path / "single" / "analysis" / "summary.json")
    seed_1 = _json(analysis / "sae_seed_1" / "summary.json")
    for key in ("values", "disparity_pct", "disparity_ci", "disparity_pct_position_matched", "statements"):
        assert seed_1[key] == single[key], key
    for lang in ("zh", "hi"):
        for layer in map(str, LAYERS):
            cell = spread["cells"][lang][layer]
            assert cell["disparity_pct"] == {"0": single["disparity_pct"][lang][layer],
                                             "1": single["disparity_pct"][lang][layer]}
            assert cell["disparity_ci"]["1"] == single["disparity_ci"][lang][layer]


@pytest.mark.slow
def test_genuinely_different_seeds_spread_and_the_rerun_reads_each_seed_from_its_own_cache(testbed_dir,
                                                                                           testbed_cache_dir, tmp_path):
    trained = run_cli(["task=train_saes", *_common(tmp_path, testbed_cache_dir), f"layers=[{LAYERS[0]}]", "langs=[hi]",
                       "sae_train.tokens=1200", "sae_train.width=64", "sae_train.steps=20",
                       "sae_train.eval_sentences=8", "sae_train.seeds=2", "sae_train.spliced_sentences=0",
                       f"hydra.run.dir={tmp_path / 'train_saes'}"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    saes = tmp_path / "train_saes" / "saes"
    assert f"sae.path_template={saes} sae.seeds=[0,1]" in trained.stdout  # what the run says to type next
    args = [f"sae.path_template={saes}", "sae.seeds=[0,1]", f"layers=[{LAYERS[0]}]", "analysis.features.enabled=false"]
    first = _analyze(tmp_path, testbed_cache_dir, tmp_path / "first", *args)
    spread = _json(tmp_path / "first" / "analysis" / "sae_seeds.json")
    sds = [cell["seed_sd"] for by_layer in spread["cells"].values() for cell in by_layer.values()]
    assert all(sd > 0 for sd in sds), sds  # two SAEs, two maps: a cache key shared by seeds would give 0
    for seed in ("0", "1"):
        own = _json(tmp_path / "first" / "analysis" / f"sae_seed_{seed}" / "summary.json")
        for lang, by_layer in spread["cells"].items():
            for layer, cell in by_layer.items():
                assert cell["disparity_pct"][seed] == own["disparity_pct"][lang][layer]
    for cell in (c for by_layer in spread["cells"].values() for c in by_layer.values()):
        values = list(cell["disparity_pct"].values())
        assert cell["mean_disparity_pct"] == pytest.approx(sum(values) / 2)
        assert cell["seed_range"] == [min(values), max(values)]
        assert cell["sign_stable"] == (min(values) > 0 or max(values) < 0)
    again = _analyze(tmp_path, testbed_cache_dir, tmp_path / "again", *args)
    assert again.stdout.count("results come from the cache") == 2 and "analyzing" not in again.stdout
    assert _json(tmp_path / "again" / "analysis" / "sae_seeds.json")["cells"] == spread["cells"]


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["task=analyze", "sae=local", "sae.path_template={saes}", "sae.seeds=[0,7]"],
     "error: sae.seeds=[0,7]: no folder seed_7 in {saes}; it holds seed_0, seed_1"),
    (["task=analyze", "sae.seeds=[0,1]"], "/saes/layer_{{layer}} is one SAE per layer: drop sae.seeds"),  # sae=testbed
    (["task=train", "sae=local", "sae.path_template={saes}", "sae.seeds=[0,1]"],
     "sae.seeds is read by task=analyze only"),
])
def test_bad_sae_seeds_are_one_line_before_any_work(testbed_dir, testbed_cache_dir, tmp_path, args, message):
    saes = identical_seeds(testbed_dir, tmp_path / "saes")
    result = run_cli([*(arg.format(saes=saes) for arg in args), *_common(tmp_path, testbed_cache_dir), "langs=[hi]",
                      f"layers=[{LAYERS[0]}]", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message.format(saes=saes) in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "analyzing" not in result.stdout and "loading" not in result.stdout
    assert not (tmp_path / "run" / "analysis").exists()
