"""Configs: an ml_collections config (configs/*.py, --config.FIELD) <-> typed settings.

defaults    the published recipe, the base of configs/*.py
settings    a config -> typed settings, checked at start-up
run_config  WORKDIR/config.json, checked on every resume
"""
