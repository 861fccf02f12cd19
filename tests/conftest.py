import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
  """(model folder, instruction data) shared by the training tests."""
  from train_helpers import make_tiny_setup
  return make_tiny_setup(str(tmp_path_factory.mktemp("tiny_setup")))
