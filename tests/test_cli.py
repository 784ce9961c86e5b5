"""train.py / evaluate.py command lines (ddetr_jax/cli.py): help, config fields, errors, logs."""

import logging
import os
import pathlib
import subprocess
import sys
import warnings

import pytest

from ddetr_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_exits_0_and_lists_the_flags(script, flag):
    done = _run(script, flag)
    assert done.returncode == 0, done.stderr
    assert "--checkpoint" in done.stdout if script == "evaluate.py" else "--workdir" in done.stdout
    assert "--[no]config_help" in done.stdout and "--[no]verbose" in done.stdout


def test_config_help_lists_every_field_with_its_value():
    done = _run("train.py", "--config=configs/quickstart.py", "--config.model.dim=32",
                "--config_help")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "--config.model.dim=32" in lines and "--config.data.name='synthetic_shapes'" in lines
    assert "--config.total_steps=1500" in lines


def test_missing_flag_is_one_line():
    done = _run("train.py", "--config=configs/quickstart.py")
    assert done.returncode == 1
    assert done.stderr == "error: --workdir must be given (--help lists the flags)\n"


@pytest.fixture
def restore_logging():
    names = ("", "ddetr_jax", "absl", "asyncio")  # "": the root logger
    saved = [(logging.getLogger(n), logging.getLogger(n).level, logging.getLogger(n).handlers[:],
              logging.getLogger(n).propagate) for n in names]
    hook = sys.unraisablehook
    with warnings.catch_warnings():
        yield
    sys.unraisablehook = hook
    for logger, level, handlers, propagate in saved:
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = propagate


def test_libraries_are_quiet_unless_verbose(restore_logging, capsys):
    cli.configure_logging(verbose=False)
    logging.getLogger("absl").warning("Metadata file does not exist: /x/_CHECKPOINT_METADATA")
    logging.getLogger("asyncio").error("Future exception was never retrieved")
    logging.getLogger("ddetr_jax.train.loop").warning("checkpoint 12 skipped")
    logging.getLogger("ddetr_jax.train.loop").info("backbone weights from x")
    captured = capsys.readouterr()
    assert captured.err == "warning: checkpoint 12 skipped\nbackbone weights from x\n"
    assert logging.getLogger("absl").isEnabledFor(logging.WARNING) is False
    cli.configure_logging(verbose=True)
    logging.getLogger("absl").setLevel(logging.NOTSET)
    assert logging.getLogger("absl").isEnabledFor(logging.WARNING)


@pytest.mark.parametrize("environ, glibc, thp, expected", [
    ({}, "glibc 2.36", "madvise", "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc 2.35", "madvise",
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({}, "glibc 2.34", "madvise", None),  # no hugetlb tunable before 2.35
    ({}, None, "madvise", None),  # not glibc (musl, macOS)
    ({}, "glibc 2.36", "always", None),  # huge pages without asking
    ({}, "glibc 2.36", "never", None),
    ({}, "glibc 2.36", None, None),  # no THP in this kernel
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc 2.36", "madvise", None),  # user's
    ({"DDETR_JAX_HUGE_PAGES": "0"}, "glibc 2.36", "madvise", None),
])
def test_huge_pages_are_asked_for_only_where_they_help(environ, glibc, thp, expected):
    env = cli.huge_pages_env(environ, glibc, thp)
    assert (env if env is None else env["GLIBC_TUNABLES"]) == expected
    if env is not None:
        assert {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"} == {
            k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"}


def _probe(tmp_path, **extra_env):
    """Runs a script under cli.run in this environment without GLIBC_TUNABLES and
    DDETR_JAX_HUGE_PAGES, plus extra_env; returns what its main sees:
    GLIBC_TUNABLES and argv."""
    script = tmp_path / "probe.py"
    script.write_text("import os, sys\nfrom ddetr_jax import cli\n"
                      "def main(argv):\n"
                      "    print(os.environ.get('GLIBC_TUNABLES'), argv[1:])\n"
                      "cli.run(main)\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "DDETR_JAX_HUGE_PAGES")} | {"PYTHONPATH": str(ROOT)}
    env |= extra_env
    done = subprocess.run([sys.executable, "-u", str(script), "a", "b"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split(maxsplit=1)


def test_scripts_restart_with_huge_pages_where_the_machine_grants_them(tmp_path):
    expected = cli.huge_pages_env({}, cli._glibc(), cli._thp_mode())
    tunables, argv = _probe(tmp_path)
    assert tunables == (expected["GLIBC_TUNABLES"] if expected else "None")
    assert argv == "['a', 'b']\n"  # the same command line after the restart
    tunables, _ = _probe(tmp_path, DDETR_JAX_HUGE_PAGES="0")
    assert tunables == "None"
