"""The console: stage lines with wall times, the closing block, other libraries' records held back (lm-eval's
truncation warnings counted), log_level checked and `debug` letting everything through."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from mlalign import console
from tests.helpers import compose_cfg, run_cli


@pytest.fixture
def console_handler():
    """A root console handler like Hydra's, configured by `console.configure`; removed afterwards."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.stream = stream
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    yield handler, stream
    root.removeHandler(handler)
    root.setLevel(old_level)


def _configure(level: str, handler):
    cfg = compose_cfg([f"log_level={level}"])
    handler.addFilter(console.ConsoleFilter())
    handler.setFormatter(console.ConsoleFormatter())
    with warnings.catch_warnings():  # configure installs filters; keep them out of the rest of the session
        console.configure(cfg)
    logging.captureWarnings(False)


def test_stage_lines_carry_wall_time_and_nest(capsys):
    console.configure(compose_cfg([]))
    with console.stage("[1/2] outer"):
        with console.stage("inner"):
            pass
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[1/2] outer ..."
    assert out[1] == "  inner ..."
    assert out[2].startswith("  inner: done in ") and out[2].endswith(" s")
    assert out[3].startswith("[1/2] outer: done in ")
    with pytest.raises(RuntimeError), console.stage("broken"):
        raise RuntimeError("x")
    assert capsys.readouterr().out.splitlines()[-1].startswith("broken: failed after ")


def test_closing_block_names_headline_outputs_plots_and_log(tmp_path, capsys):
    console.configure(compose_cfg([]))
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "layer_curves.png").write_bytes(b"png")
    (tmp_path / "run.log").write_text("")
    with console.stage("[1/1] work"):
        pass
    console.headline("- hi: +4.4%")
    console.headline("first", at=0)
    console.output("report", tmp_path / "report.md")
    lines = console.closing_block("pipeline", tmp_path, 75.0)
    text = "\n".join(lines)
    assert lines[1] == f"task=pipeline finished in 1m15s: {tmp_path}"
    assert "time: work " in text
    assert text.index("first") < text.index("- hi: +4.4%")
    assert f"report: {tmp_path / 'report.md'}" in text
    assert "analysis/ layer_curves.png" in text
    assert f"log:    {tmp_path / 'run.log'}" in text


def test_library_records_go_to_the_log_only_and_truncations_are_counted(console_handler):
    handler, stream = console_handler
    _configure("info", handler)
    logging.getLogger("mlalign.tasks.x").info("mlalign info")
    logging.getLogger("mlalign.tasks.x").debug("mlalign detail")
    logging.getLogger("lm_eval.evaluator").info("lm-eval chatter")
    logging.getLogger("transformers.modeling_utils").warning("transformers chatter")
    hf = logging.getLogger("lm_eval.models.huggingface")
    for _ in range(3):
        hf.warning("Combined length of context (300) and continuation (2) exceeds model's maximum length (256). "
                   "Truncating 47 tokens from the left.")
    logging.getLogger("some.library").error("a real error")
    shown = stream.getvalue()
    assert "mlalign info" in shown and "error: a real error" in shown
    assert "mlalign detail" not in shown and "chatter" not in shown and "Truncating" not in shown
    assert console.take_count("lm_eval_truncation") == 3
    assert console.take_count("lm_eval_truncation") == 0


def test_log_level_debug_lets_everything_through(console_handler):
    handler, stream = console_handler
    _configure("debug", handler)
    logging.getLogger("lm_eval.evaluator").warning("lm-eval chatter")
    logging.getLogger("mlalign.tasks.x").debug("mlalign detail")
    shown = stream.getvalue()
    assert "lm-eval chatter" in shown and "mlalign detail" in shown
    _configure("info", handler)  # back to the default for later tests in this process


def test_known_warnings_are_silenced_by_module_and_message_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console._filter_known_warnings()
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                               "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                               "other.py", 1, module="mlalign.other")
        warnings.warn_explicit("something else is deprecated", FutureWarning, "modeling_utils.py", 1,
                               module="transformers.modeling_utils")
    assert [str(w.message) for w in caught] == ["`is_gradient_checkpointing` is deprecated and will be removed in v6.",
                                                "something else is deprecated"]


def test_unknown_log_level_is_one_error_line(tmp_path):
    result = run_cli(["log_level=loud", f"paths.root_dir={tmp_path}"])
    assert result.returncode == 1
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: log_level=loud is not one of debug, info, warning"), \
        result.stderr


def test_a_repeated_warning_is_shown_once(console_handler):
    handler, stream = console_handler
    _configure("info", handler)
    for _ in range(2):
        logging.getLogger("mlalign.analysis.metrics").warning("36.3% of ml's sentences are cut at max_length")
    assert stream.getvalue().count("cut at max_length") == 1


def test_an_error_after_a_failure_inside_a_loop_starts_its_own_line():
    """Issue 30 audit: a full disk at a training checkpoint printed `train:  50%|...| error: no room to write ...`,
    the error glued to the bar the failure left open (so not a line of its own)."""
    import io

    from tqdm import tqdm

    from mlalign.console import end_progress_bars

    stream = io.StringIO()
    bar = tqdm(total=4, desc="train", file=stream)
    bar.update(2)
    end_progress_bars()
    assert bar.disable or stream.getvalue().endswith("\n")  # closed: the next print starts a fresh line
    print("error: x", file=stream)
    assert stream.getvalue().splitlines()[-1] == "error: x"
