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
