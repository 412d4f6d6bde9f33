"""`PIGGYBACK_TORCH_THREADS`: a CPU engine runs its forwards on that many threads; 0 leaves torch's default."""

from __future__ import annotations

import pytest
import torch

from service.engine import Engine
from service.metrics import Metrics
from tests.support.builders import server_settings


@pytest.fixture
def threads_restored():
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


def test_the_setting_sets_the_forward_threads_and_zero_leaves_them(tmp_path, backbone_file, threads_restored):
    wanted = 1 if threads_restored != 1 else 2
    Engine(server_settings(backbone_file, tmp_path / "a", torch_threads=0), Metrics())
    assert torch.get_num_threads() == threads_restored
    Engine(server_settings(backbone_file, tmp_path / "b", torch_threads=wanted), Metrics())
    assert torch.get_num_threads() == wanted
