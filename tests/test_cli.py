"""train.py / evaluate.py command lines (ddetr_jax/cli.py): help, config fields, errors, logs."""

import logging
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
