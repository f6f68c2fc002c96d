"""The head baselines, on each output embedding: a linear probe and CLIP-Adapter."""
import torch.nn as nn


class ClipAdapterHead(nn.Module):
    """CLIP-Adapter: alpha * MLP(f) + (1 - alpha) * f. Unlike the other methods it is NOT the identity at
    the start (its MLP is random, as in the original), so it changes CLIP's embeddings before any training."""

    def __init__(self, dim, reduction, alpha):
        super().__init__()
        hidden = dim // reduction
        self.mlp = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(),
                                 nn.Linear(hidden, dim, bias=False), nn.ReLU())
        self.alpha = alpha

    def forward(self, f):
        return self.alpha * self.mlp(f) + (1 - self.alpha) * f


def identity_linear(dim):
    layer = nn.Linear(dim, dim)
    nn.init.eye_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer
