"""What train.py and evaluate.py share on the command line.

    run(main, required=("config", "workdir"))   # instead of absl's app.run(main)
    start()   # first thing in main: multi-host, compilation cache, logging

run() first restarts the script with glibc's malloc asking for transparent
huge pages where the kernel grants them on request (THP mode "madvise", glibc
>= 2.35; DDETR_JAX_HUGE_PAGES=0 turns this off): XLA:CPU allocates each
program's temporaries (~120 MB a quickstart step) with malloc, and on 2 MB
pages the CPU step runs ~9% faster, with the same results
(docs/benchmarks.md, "Quickstart").

--help (-h, -?, --helpshort, --helpfull) prints the flags and exits with
status 0 (absl exits 1); --config_help lists the fields of --config, each
settable as --config.FIELD=VALUE; a missing required flag is one error line.
configure_logging() keeps the libraries (orbax, TensorFlow Datasets, grain:
absl logging; asyncio) quiet unless --verbose, and prints this package's
messages above the progress bar.
"""

from __future__ import annotations

import logging
import os
import re
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


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None."""
    try:
        with open(THP_MODE_FILE) as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return None


def huge_pages_env(environ, glibc: str | None, thp_mode: str | None) -> dict | None:
    """The environment to restart with so that malloc asks for huge pages, or None
    when that is off (DDETR_JAX_HUGE_PAGES=0), already asked, or would change
    nothing: not glibc >= 2.35 (glibc: os.confstr's "glibc 2.36"), or the kernel's
    THP mode is not "madvise" ("always" gives them anyway, "never" not at all)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    version = re.match(r"glibc (\d+)\.(\d+)", glibc or "")
    if (environ.get("DDETR_JAX_HUGE_PAGES") == "0" or "glibc.malloc.hugetlb" in tunables
            or thp_mode != "madvise" or not version
            or (int(version[1]), int(version[2])) < (2, 35)):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, HUGE_PAGES_TUNABLE)))}


def _glibc() -> str | None:
    """This process's C library as os.confstr names it ("glibc 2.36"), or None."""
    return os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in os.confstr_names \
        else None


def _restart_with_huge_pages() -> None:
    """Replaces this process with the same command under huge_pages_env, if any
    (none off Linux: no THP mode file there)."""
    env = huge_pages_env(os.environ, _glibc(), _thp_mode())
    if env is not None and sys.executable and os.path.isfile(sys.argv[0]):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def run(main, required=()) -> None:
    """app.run(main) with the help and required flags of _parse (the script lists
    this module's flags in its help with flags.adopt_module_key_flags(cli)), in a
    process whose malloc asks for huge pages where that helps (module doc)."""
    _restart_with_huge_pages()
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
