"""Example models served by the demo and the tests.

Serve one with ``pytorch2jax-server --model mlp='pytorch2jax_server.examples:mlp()'``.
Factories seed torch's generator so that a worker and an in-process reference built from
the same factory hold the same weights.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

__all__ = [
    "MLP",
    "ConvNet",
    "DictOutput",
    "EmbeddingRegressor",
    "bert",
    "bf16_mlp",
    "convnet",
    "dict_output",
    "double",
    "dropout_mlp",
    "embedding",
    "gpt2",
    "linear10",
    "masked_select",
    "mlp",
    "noisy_scale",
    "scale_shift",
    "slow",
    "wide_mlp",
]


class MLP(nn.Module):
    """A multilayer perceptron with tanh activations."""

    def __init__(self, in_features: int = 8, hidden: int = 64, out_features: int = 1, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    """A small image classifier: two convolutions, pooling, a linear head (NCHW inputs)."""

    def __init__(self, channels: int = 3, width: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2)
        self.head = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(images))
        h = torch.relu(self.conv2(h))
        return self.head(h.mean(dim=(2, 3)))


class DictOutput(nn.Module):
    """Two inputs in, a dict of two outputs out."""

    def __init__(self, features: int = 4):
        super().__init__()
        self.proj = nn.Linear(features, features)

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, scale: float = 1.0):
        h = self.proj(x)
        return {"sum": (h + y) * scale, "prod": h * y}


class EmbeddingRegressor(nn.Module):
    """Integer token ids in, one score per sequence out."""

    def __init__(self, vocab: int = 50, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens) * weights[..., None]
        return self.out(e.mean(dim=-2)).squeeze(-1)


class AttentionBlock(nn.Module):
    """Multi-head self-attention with a residual connection, layer norm and a
    feed-forward layer (batch first).

    The attention is written out (projections, softmax of scaled scores): torch 2.13 has
    no forward-mode AD for its fused attention kernels on CPU (scaled_dot_product_attention,
    and nn.MultiheadAttention's fast path in eval mode), so jax.jvp, jacfwd and hessian
    could not run through them.
    """

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.ff = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *batch, length, dim = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        split = lambda t: t.reshape(*batch, length, self.heads, dim // self.heads).transpose(-2, -3)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        weights = torch.softmax(q @ k.transpose(-1, -2) / (dim // self.heads) ** 0.5, dim=-1)
        attended = (weights @ v).transpose(-2, -3).reshape(*batch, length, dim)
        h = self.norm(x + self.proj(attended))
        return h + torch.tanh(self.ff(h))


class LSTMRegressor(nn.Module):
    """An LSTM over a sequence (batch first), then a score per sequence."""

    def __init__(self, features: int = 4, hidden: int = 8):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq, _ = self.lstm(x)
        return self.out(seq[..., -1, :]).squeeze(-1)


def mlp(in_features: int = 8, hidden: int = 64, out_features: int = 1, depth: int = 3) -> MLP:
    torch.manual_seed(0)
    return MLP(in_features, hidden, out_features, depth)


def convnet() -> ConvNet:
    torch.manual_seed(1)
    return ConvNet()


def dict_output() -> DictOutput:
    torch.manual_seed(2)
    return DictOutput()


def embedding() -> EmbeddingRegressor:
    torch.manual_seed(3)
    return EmbeddingRegressor()


def bf16_mlp() -> MLP:
    torch.manual_seed(4)
    return MLP(4, 16, 2, depth=2).to(torch.bfloat16)


def attention() -> AttentionBlock:
    torch.manual_seed(8)
    return AttentionBlock()


def lstm() -> LSTMRegressor:
    torch.manual_seed(9)
    return LSTMRegressor()


def bn_mlp() -> nn.Sequential:
    """Linear, BatchNorm1d, tanh, Linear, with running statistics away from their start."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1))
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 4) * 3 + 1)
    return model


def dropout_mlp() -> nn.Sequential:
    """Linear, ReLU, Dropout(0.5), Linear, in training mode: each call draws a mask."""
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))


def gpt2(**config) -> nn.Module:
    """A GPT-2 language model from a config (2 layers, 64 wide, random weights, nothing
    downloaded), in training mode (dropout 0.1). Needs ``transformers`` (the test extra)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(12)
    settings = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32)
    settings.update(bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**settings, **config}))


def bert(**config) -> nn.Module:
    """A BERT sequence classifier from a config (2 layers, 64 wide, 3 classes, random
    weights), in training mode (dropout 0.1). Needs ``transformers`` (the test extra)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(13)
    settings = dict(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=32,
        num_labels=3,
    )
    return BertForSequenceClassification(BertConfig(**{**settings, **config}))


def linear10() -> nn.Linear:
    """The 10x10 Linear of the original pytorch2jax README, used by the benchmarks."""
    torch.manual_seed(5)
    return nn.Linear(10, 10)


def wide_mlp() -> MLP:
    """A 3-layer MLP 1024 wide (1024 -> 1024 -> 1024 -> 1024), used by the benchmarks."""
    torch.manual_seed(6)
    return MLP(1024, 1024, 1024, depth=3)


class _Pause(nn.Module):
    """Waits, then passes its input on: a stand-in for a slow layer."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_fake(x):  # shape inference need not wait
            time.sleep(self.seconds)
        return x


def slow(seconds: float = 5.0, steps: int = 50) -> nn.Sequential:
    """A Linear(4, 4), then ``steps`` pauses that take ``seconds`` in all: slow enough
    to cancel a call, kill a worker or stop it in the middle of one (the fault tests)."""
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(4, 4), *(_Pause(seconds / steps) for _ in range(steps)))


def double(x: torch.Tensor) -> torch.Tensor:
    """``2 * x``: as much output as input, used by the transfer benchmarks."""
    return x * 2


def scale_shift(x: torch.Tensor, shift: torch.Tensor, *, scale: float = 2.0) -> torch.Tensor:
    """A plain function: ``x * scale + sin(shift)``."""
    return x * scale + torch.sin(shift)


def noisy_scale(x: torch.Tensor) -> torch.Tensor:
    """The original README's function: uniform noise times ``x``."""
    return torch.rand(x.shape, device=x.device) * x


def long_error(x: torch.Tensor, *, length: int = 12 * 1024) -> torch.Tensor:
    """Fails with a message ``length`` characters long (a shape error on a large tuple,
    say): the worker cuts it to stay within gRPC's bounds on error details."""
    raise ValueError("START " + "x" * length + " END")


def error_with_traceback(x: torch.Tensor) -> torch.Tensor:
    """Fails as a DataLoader worker's error does, with a traceback inside the message."""
    raise RuntimeError(
        "Caught ValueError in DataLoader worker process 0.\n"
        "Original Traceback (most recent call last):\n"
        '  File "/srv/app/data.py", line 52, in fetch\n'
        "    data = [self.dataset[idx] for idx in possibly_batched_index]\n"
        "            ~~~~~~~~~~~~^^^^^\n"
        "ValueError: sample 7 is corrupt"
    )


def masked_select(x: torch.Tensor) -> torch.Tensor:
    """Positive entries of ``x``: its output shape depends on the data."""
    return x[x > 0]


_calls = 0


def counted(x: torch.Tensor) -> torch.Tensor:
    """``sin(x) * x``, counting how often torch runs it (shape inference not counted):
    ``calls_of_counted`` tells, for tests that a batch is one call."""
    global _calls
    if not is_fake(x):
        _calls += 1
    return torch.sin(x) * x


def calls_of_counted(like: torch.Tensor) -> torch.Tensor:
    """How many times ``counted`` ran in this process (``like`` is not used: a function
    of no tensors is taken for a factory missing its ``()``)."""
    return torch.tensor(_calls)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` for class ``labels``: torch takes only int64 labels."""
    return torch.nn.functional.cross_entropy(logits, labels)


def top_class(logits: torch.Tensor) -> torch.Tensor:
    """The index of the largest logit: an int64 output."""
    return torch.argmax(logits, dim=-1)


class DynamicCache:
    """Stands for ``transformers``' cache object: not a tensor."""


def with_cache(x: torch.Tensor, *, use_cache: bool = True) -> dict:
    """A Hugging Face-like output: ``{"logits": 2 x}``, plus a cache object unless
    ``use_cache=False``."""
    out = {"logits": x * 2}
    if use_cache:
        out["past_key_values"] = DynamicCache()
    return out


def flagged(x: torch.Tensor, flag) -> torch.Tensor:
    """``2 x`` if ``flag``, else ``x[:1]``: the output shape depends on a Python flag."""
    return x * 2 if flag else x[:1]


def unbatchable(x: torch.Tensor) -> torch.Tensor:
    """``2 * x`` through an in-place write into a tensor made inside: torch.func.vmap
    cannot batch it (a batched value cannot be written into an unbatched one)."""
    out = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    out += x
    return out * 2
