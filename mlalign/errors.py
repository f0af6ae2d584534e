"""The one exception type for mistakes a user can make (bad config, missing files, no model access)."""


class UserError(Exception):
    """A problem the user can fix. `run.py` prints the message as one line and exits non-zero, without a traceback.

    The message must say what was wrong and what to type instead.
    """


def one_line(text: str) -> str:
    """A multi-line message as one line: indented lines (Hydra's lists of options) continue the line above."""
    parts: list[str] = []
    for raw in str(text).splitlines():
        line = raw.strip()
        if line.startswith("Config search path"):  # Hydra's search path: where it looked, not what to type
            break
        if not line:
            continue
        if raw[:1] in (" ", "\t") and parts:
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
        else:
            parts.append(line.rstrip("."))
    return "; ".join(parts)


def composition_error_line(err: BaseException) -> str:
    """The `error:` line for a command line Hydra cannot compose (an unknown key or option, a value of the wrong type,
    a parse error): its message and its cause's first line, which names the key (OmegaConf's detail lines dropped)."""
    line = one_line(err)
    override = getattr(err, "override", None)  # hydra.errors.OverrideParseException
    if override and override not in line:
        line = f"cannot parse the override {override!r}: {line}"
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0].strip()
        if first and first not in line:
            line += f" ({first})"
    return (f"error: {line}; `python run.py --help` lists every group and option "
            "(add HYDRA_FULL_ERROR=1 for Hydra's stack trace)")


def report_composition_errors_in_one_line() -> None:
    """Hydra prints a command line it cannot compose over several lines (message, cause, full_key, reference_type,
    object_type, a hint about HYDRA_FULL_ERROR); a UserError is one `error:` line. Wraps Hydra's reporter so the
    composition errors (hydra.errors.CompactHydraException, not a task's InstantiationException) are one line too;
    everything else (a task's own failures, HYDRA_FULL_ERROR=1) goes through Hydra's reporter unchanged."""
    import os
    import sys

    from hydra._internal import utils as hydra_utils
    from hydra.errors import (ConfigCompositionException, OverrideParseException, SearchPathException)

    original = hydra_utils.run_and_report
    if getattr(original, "mlalign_one_line", False):
        return
    composition = (ConfigCompositionException, OverrideParseException, SearchPathException)

    def run_and_report(func):
        try:
            return func()
        except composition as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(composition_error_line(err), file=sys.stderr)
            sys.exit(1)
        except Exception as err:  # Hydra's own report of anything else
            def again(err=err):
                raise err
            return original(again)

    run_and_report.mlalign_one_line = True
    hydra_utils.run_and_report = run_and_report


SIGTERM_EXIT_STATUS = 143  # 128 + SIGTERM, what a shell reports for a process the signal ended


def stop_in_one_line_on_early_sigterm() -> None:
    """A SIGTERM that arrives before the task dispatcher installs its own handler (while torch, transformers and
    Hydra import, or the config composes: seconds of a fresh run) ends the run with one `error:` line and exit status
    143, as every other stop does, instead of Python's silent death by signal (-15, nothing printed). No task has
    started then, so nothing in the run directory is marked complete. The dispatcher's handler (tasks._StopOnSigterm)
    replaces this one while a task runs and puts it back after."""
    import os
    import signal
    import sys

    def stop(signum, frame):
        sys.stderr.write("error: stopped by SIGTERM outside any task (while loading libraries, composing the config "
                         "or exiting); no task result was written by this run after it: run the same command again\n")
        sys.stderr.flush()
        os._exit(SIGTERM_EXIT_STATUS)  # not SystemExit: an import half-done is no state to unwind through

    signal.signal(signal.SIGTERM, stop)
