"""Test-wide set-up: 8 simulated CPU devices, set before jax is imported."""
import os

import pytest

# The simulated devices meet in collectives; on a loaded machine one can wait
# past XLA's default 40 s rendezvous limit, which aborts the process.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=600").strip()
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")



@pytest.fixture(scope="module")
def home(tmp_path_factory):
  """A fresh $FUSION_HOME for one test module (its caches shared by its tests)."""
  path = str(tmp_path_factory.mktemp("home"))
  os.environ["FUSION_HOME"] = path  # Module scope: monkeypatch is per test.
  yield path
  del os.environ["FUSION_HOME"]
