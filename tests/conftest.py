import pytest
import torch

from par_deploy.config import preset
from par_deploy.model.par import PARModel

torch.set_num_threads(1)


def randomize_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter: the zero-initialised output layers otherwise make an untrained de-tokenizer
    output 0, which would make parity tests pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture
def tiny_cfg():
    return preset("tiny")


@pytest.fixture
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return randomize_(PARModel(tiny_cfg)).eval()
