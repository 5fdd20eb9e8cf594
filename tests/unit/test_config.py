"""Job configs and key=value overrides: every job valid, every bad input a clear ConfigError."""

import pytest

from workloads.config import TrainConfig, apply_overrides
from workloads.errors import ConfigError
from workloads.jobs import JOBS, describe_jobs, get_job


@pytest.mark.parametrize("name", sorted(JOBS))
def test_every_job_config_is_valid(name):
    cfg = get_job(name)
    assert cfg.job == name
    assert cfg.max_steps > 0 or cfg.epochs > 0


def test_seed_jobs_keep_the_articles_hyperparameters():
    a, b = get_job("seed000-cnn"), get_job("seed001-convnet")
    assert (a.model, a.optimizer, a.lr, a.batch_size, a.epochs, a.momentum) == ("seed_cnn", "sgd", 0.01, 64, 10, 0.0)
    assert (b.model, b.optimizer, b.lr, b.batch_size, b.epochs, b.momentum) == ("seed_convnet", "sgd", 0.001, 64, 10, 0.0)


def test_describe_jobs_gives_one_line_each():
    lines = dict(describe_jobs())
    assert set(lines) == set(JOBS)
    assert all(doc and "\n" not in doc for doc in lines.values())


def test_overrides_are_typed():
    cfg = apply_overrides(get_job("convnet-digits"), ["lr=0.1", "max_steps=7", "augment=false", "optimizer=adamw"])
    assert (cfg.lr, cfg.max_steps, cfg.augment, cfg.optimizer) == (0.1, 7, False, "adamw")


@pytest.mark.parametrize(
    "override, message",
    [
        ("lrr=0.1", "unknown key 'lrr' (did you mean lr"),
        ("lr=fast", "lr expects a number; got 'fast'"),
        ("max_steps=1.5", "max_steps expects an integer; got '1.5'"),
        ("max_steps=-3", "max_steps must be >= 0; got -3"),
        ("augment=maybe", "augment expects true or false"),
        ("optimizer=lion", "optimizer must be one of sgd, adamw; got 'lion'"),
        ("batch_size=0", "batch_size must be > 0"),
        ("lr=0", "lr must be > 0"),
        ("justakey", "is not key=value"),
        ("job=other", "unknown key 'job'"),
        ("model=gpt", "model gpt cannot train on dataset digits"),
    ],
)
def test_bad_override_names_the_key_and_choices(override, message):
    with pytest.raises(ConfigError) as info:
        apply_overrides(get_job("convnet-digits"), [override])
    assert message in str(info.value)


def test_unknown_job_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown job 'nope'; valid jobs: seed000-cnn"):
        get_job("nope")


def test_training_length_is_required():
    with pytest.raises(ConfigError, match="max_steps=N or epochs=N"):
        TrainConfig()
