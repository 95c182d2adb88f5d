"""Clustered modules under activation checkpointing (torch.utils.checkpoint): the forward has
side effects (the step counter, the centroids' warm start), and the recomputation in backward
must replay the step, not take another one. A checkpointed training run gives the same loss,
gradients, centroids and step as the plain run."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import edkm


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self, ckpt=None):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.ckpt = ckpt

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=self.ckpt) if self.ckpt is not None else b(x)
        return x.pow(2).mean()


CONFIGS = {
    "fused-dkm_linear": edkm.Config(bits=3, init="kmeans++"),
    "outliers-unfused": edkm.Config(bits=3, init="kmeans++", outlier_fraction=0.05),
    "vectors": edkm.Config(bits=3, init="kmeans++", cluster_dim=2),
    "8-row-LUTs": edkm.Config(bits=2, init="kmeans++", group_size=8),
}


def train(model, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 40, (4, 6), generator=g)
        opt.zero_grad()
        loss = model(ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_checkpointed_training_equals_plain(cfg, reentrant):
    torch.manual_seed(0)
    plain = Net().double()
    edkm.palettize_(plain, CONFIGS[cfg])
    ckpt = copy.deepcopy(plain)
    ckpt.ckpt = reentrant
    a, b = train(plain), train(ckpt)
    assert a == b
    for (name, p), (_, q) in zip(plain.state_dict().items(), ckpt.state_dict().items()):
        if isinstance(p, torch.Tensor):
            assert torch.equal(p, q), name
    for (name, m), (_, n) in zip(edkm.clustered_modules(plain), edkm.clustered_modules(ckpt)):
        assert m.edkm_step == n.edkm_step == 3, name
