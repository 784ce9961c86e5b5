"""What train.py and evaluate.py share on the command line.

    run(main, required=("config", "workdir"))   # instead of absl's app.run(main)
    start()   # first thing in main: multi-host, compilation cache, logging

--help (-h, -?, --helpshort, --helpfull) prints the flags and exits with
status 0 (absl exits 1); --config_help lists the fields of --config, each
settable as --config.FIELD=VALUE; a missing required flag is one error line.
configure_logging() keeps the libraries (orbax, TensorFlow Datasets, grain:
absl logging; asyncio) quiet unless --verbose, and prints this package's
messages above the progress bar.
"""

from __future__ import annotations

import logging
import sys
import warnings

from absl import app, flags

HELP = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")

VERBOSE = flags.DEFINE_bool("verbose", False, "show the libraries' log messages (orbax, "
                            "TensorFlow Datasets, grain), hidden by default")
CONFIG_HELP = flags.DEFINE_bool("config_help", False, "list the fields of --config (each "
                                "can be set with --config.FIELD=VALUE) and exit")
COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                  "multi-host: HOST:PORT of process 0")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: processes in the job")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")


def config_fields(config) -> list[str]:
    """'--config.FIELD=value' (FIELD dotted: model.dim) for every field, in order."""
    from ddetr_jax.config.run_config import as_json, flatten
    return [f"--config.{name}={value!r}" for name, value in flatten(as_json(config)).items()]


def _parse(argv, required):
    """absl's flag parsing, but help exits 0, --config_help lists the config's fields,
    and a missing required flag or a bad value is one line on stderr (exit 1)."""
    end = argv.index("--") if "--" in argv else len(argv)
    asked = [arg for arg in argv[1:end] if arg in HELP]
    try:
        remaining = flags.FLAGS([arg for i, arg in enumerate(argv)
                                 if not (0 < i < end and arg in HELP)])
    except flags.Error as error:
        sys.exit(f"error: {error}\nPass --help to list the flags.")
    if asked:
        app.usage(shorthelp="--helpfull" not in asked, writeto_stdout=True)
        print("\n--config_help (with --config=FILE) lists the --config.* fields.")
        sys.exit(0)
    if CONFIG_HELP.value:
        config = flags.FLAGS["config"].value
        if config is None:
            sys.exit("error: --config_help lists the fields of --config: give --config=FILE")
        print("\n".join(config_fields(config)))
        sys.exit(0)
    missing = [f"--{name}" for name in required if flags.FLAGS[name].value is None]
    if missing:
        sys.exit(f"error: {', '.join(missing)} must be given (--help lists the flags)")
    return remaining


def run(main, required=()) -> None:
    """app.run(main) with the help and required flags of _parse (the script lists
    this module's flags in its help with flags.adopt_module_key_flags(cli))."""
    app.run(main, flags_parser=lambda argv: _parse(argv, required))


def start() -> None:
    """What train.py and evaluate.py do first: join the multi-host job when
    --coordinator_address is given, turn on the persistent compilation cache,
    configure_logging()."""
    import jax

    from ddetr_jax.compile_cache import enable_compilation_cache
    if COORDINATOR.value:
        jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
    enable_compilation_cache()
    configure_logging()


def _drop_closed_loop_errors(unraisable) -> None:
    """sys.unraisablehook that drops 'Event loop is closed' from orbax's tensorstore
    callbacks after a failed read (the failure itself is reported as an error)."""
    if not (unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


class _AboveProgressBar(logging.Handler):
    """Writes records with tqdm.write, so they do not break the progress bar."""

    def emit(self, record):
        from tqdm import tqdm
        prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        tqdm.write(prefix + record.getMessage(), file=sys.stderr)


def configure_logging(verbose: bool | None = None) -> None:
    """This package's INFO and above above the progress bar; the libraries' logs only
    if verbose (default: --verbose)."""
    verbose = VERBOSE.value if verbose is None else verbose
    package = logging.getLogger("ddetr_jax")
    package.setLevel(logging.INFO)
    package.addHandler(_AboveProgressBar())
    package.propagate = False
    if verbose:
        return
    logging.getLogger().setLevel(logging.WARNING)  # e.g. faster_coco_eval's INFO lines
    for name in ("absl", "asyncio"):  # orbax, tfds and grain log through absl
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"orbax\.")
    sys.unraisablehook = _drop_closed_loop_errors
