import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hub_server import LocalHub  # noqa: E402  (needs the sys.path entry above)


@pytest.fixture
def local_hub(tmp_path):
    """A Hub-compatible server (tests/hub_server.py) on 127.0.0.1 storing its repos under tmp_path."""
    with LocalHub(tmp_path / "hub") as hub:
        yield hub
