"""Fixtures the smoke tests share."""

from pathlib import Path

import pytest

from tests.shapesworld_cache import SYNTH
from vlp.data.cache import prepare_shapesworld


@pytest.fixture(scope="session")
def shapesworld_cache(tmp_path_factory) -> Path:
    """A `data.cache_dir` that already holds ShapesWorld made with SYNTH, generated once per
    session: every run pointed at it finds its data ready instead of generating it again.
    `vlp train` generating its data on first use stays covered by test_wheel_install, whose run
    starts from an empty cache."""
    cache = tmp_path_factory.mktemp("shapesworld-cache")
    prepare_shapesworld(cache, SYNTH, progress=False)
    return cache
