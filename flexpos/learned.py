"""Learned absolute encodings: a lookup table (BERT) and an MLP of continuous positions."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ._checks import check_bool, check_positive_int, warn_caller
from ._compile import lazy_compile
from ._host import functorch_active, host_reads, tracing
from .inputs import InputTransform, masked_add


def position_mlp(dim: int, depth: int, norm: bool, out: int | None = None) -> nn.ModuleList:
    """``Linear(1, dim) -> [Norm] { -> SiLU -> Linear -> [Norm] } * (depth-1) [-> Linear(dim, out)]``.

    Module names match bio-attention's (``mlp.0.0.weight`` ...) so checkpoints load.
    """
    dim, depth = check_positive_int("dim", dim), check_positive_int("depth", depth)
    norm_layer = (lambda: nn.LayerNorm(dim)) if check_bool("norm", norm) else nn.Identity
    layers = nn.ModuleList([nn.Sequential(nn.Linear(1, dim), norm_layer())])
    for _ in range(depth - 1):
        layers.append(nn.Sequential(nn.SiLU(), nn.Linear(dim, dim), norm_layer()))
    if out is not None:
        layers.append(nn.Linear(dim, check_positive_int("n_heads", out)))
    return layers


def run_mlp(mlp: nn.ModuleList, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """x (..., 1) -> (..., features), in ``dtype`` (default: the MLP's, at least float32), also
    under autocast or in a ``.half()`` model: inputs are positions (up to 1e9 / divide), whose
    features bf16 would round by up to 0.4% of their size and float16 overflows (65504). Another
    ``dtype`` runs on cast copies of the parameters (gradients reach them)."""
    own = next(mlp.parameters()).dtype  # the first layer's, Linear(1, dim)
    dtype = dtype or (own if own.itemsize >= 4 else torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(dtype)
        for layer in mlp:
            if dtype == own:
                x = layer(x)
            else:
                cast = {name: p.to(dtype) for name, p in layer.named_parameters()}
                x = torch.func.functional_call(layer, cast, (x,))
    return x


def watch_autocast(x: Tensor) -> Tensor:
    """``x``, a position MLP's output (or a result of it) outside compiled code, hooked to warn
    where its backward runs inside an autocast block (see :func:`_warn_if_autocast`)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.requires_grad and not tracing() and not functorch_active():
        x.register_hook(functools.partial(_warn_if_autocast, device))
    return x


def mlp_dtype(compute: torch.dtype) -> torch.dtype | None:
    """The dtype to run a position MLP in for inputs computing in ``compute``: float64 for
    float64 inputs, else None (the MLP's own, at least float32)."""
    return torch.float64 if compute == torch.float64 else None


def _warn_if_autocast(device: str, grad: Tensor) -> None:
    """Backward hook on a position MLP's output: autocast cannot be switched off for the MLP's
    backward, whose matmuls then run in bfloat16 or float16 where backward runs inside the
    autocast block (measured: DPB's parameter gradients 35-44% off, which cancel over rows)."""
    if torch.is_autocast_enabled(device):
        warn_caller(
            "backward() runs inside a torch.autocast block: the gradients of flexpos' position MLPs "
            "(DPB, LearnedContinuous) are then computed in low precision. Run backward() after the "
            "autocast block, as PyTorch recommends."
        )


@lazy_compile
def _mlp_add(mlp: nn.ModuleList, x: Tensor, pos: Tensor, keep: Tensor, div: Tensor) -> Tensor:
    """x (N, L, dim) + keep (N, L) * mlp(pos (N, L) / div) -> (N, L, dim), one compiled kernel."""
    return masked_add(x, run_mlp(mlp, (pos / div)[..., None], mlp_dtype(x.dtype)), keep)


@lazy_compile
def _vocab_add(emb: nn.Embedding, x: Tensor, pos: Tensor, keep: Tensor) -> Tensor:
    """x (N, L, dim) + keep (N, L) * emb(pos (N, L)) -> (N, L, dim), one compiled kernel."""
    return masked_add(x, emb(pos), keep)


_masked_add = lazy_compile(masked_add)  # the add alone, after an eager lookup (see _trains_on_cpu)


def _trains_on_cpu(emb: nn.Embedding) -> bool:
    """Whether a CPU call will backpropagate into the table. With Inductor's CPU backward of
    the lookup, a scatter-add, forward + backward took 1.3-1.7x as long as looking up eagerly
    (x (1, L, 512), L=512-8192; benchmarks/results/cpu-2026-11-30.txt). Forward alone the
    compiled lookup is the faster at L=8192."""
    return emb.weight.device.type == "cpu" and torch.is_grad_enabled() and emb.weight.requires_grad


class LearnedVocab(InputTransform):
    """Adds a learned embedding of integer positions ``0 <= p < max_seq_len``: x (B, *, L, dim)
    and pos (B, *, L') -> (B, *, L, dim); the first L - L' tokens get nothing added.

    Example::

        enc = LearnedVocab(64, max_seq_len=512)
        x = enc(torch.randn(2, 100, 64), pos=torch.randint(0, 512, (2, 100)))
    """

    def __init__(self, dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.emb = nn.Embedding(check_positive_int("max_seq_len", max_seq_len), self.dim)

    def encode_add(self, x: Tensor, pos: Tensor, keep: Tensor) -> Tensor:
        if pos.is_floating_point():
            raise TypeError("pos must hold integer positions for LearnedVocab, got a floating point dtype")
        n = self.emb.num_embeddings
        if host_reads() and pos.numel() > 0 and (int(pos.min()) < 0 or int(pos.max()) >= n):
            raise ValueError(
                f"pos must lie in [0, {n - 1}] for LearnedVocab(max_seq_len={n}), "
                f"got range [{int(pos.min())}, {int(pos.max())}]"
            )
        if _trains_on_cpu(self.emb):
            return _masked_add(x, self.emb(pos.long()), keep)
        return _vocab_add(self.emb, x, pos.long(), keep)


class LearnedContinuous(InputTransform):
    """Adds ``MLP(p / divide)``: a learned embedding that is continuous in the position.
    x (B, *, L, dim) and pos (B, *, L') int or float -> (B, *, L, dim); the first L - L' tokens
    get nothing added.

    Example::

        enc = LearnedContinuous(64, depth=2)
        x = enc(torch.randn(2, 100, 64), pos=torch.rand(2, 100) * 50)
    """

    def __init__(
        self, dim: int, depth: int = 1, norm: bool = False, divide: float = 1.0, learned_div: bool = False
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self._init_divisor(divide, learned_div)
        self.mlp = position_mlp(dim, depth, norm)

    def encode_add(self, x: Tensor, pos: Tensor, keep: Tensor) -> Tensor:
        # pos cast here: one compiled variant for int and float positions
        return watch_autocast(_mlp_add(self.mlp, x, pos.double(), keep, self.divisor(torch.float64)))
