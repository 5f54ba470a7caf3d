"""The LM head and its cross-entropy fused and chunked over the target rows (the idea of
Liger-Kernel's ``FusedLinearCrossEntropy``, in plain PyTorch).

Why: unfused, a train step keeps the (targets, vocab) logits, their fp32 copy and the
log-probabilities for backward, then zero-fills and fills gradients of that size; at a 32k
vocabulary log_softmax and those zero-fills were ~40 % of a step, the head's matmuls 45 %.
Here each chunk of rows gets its logits, its loss and at once its gradients w.r.t. the hidden
states and the head (softmax - one-hot, times the row's share of the loss), so nothing of size
(targets, vocab) outlives a chunk; backward only scales the stored gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# Rows per chunk: 512, or fewer where their fp32 logits would pass 2**25 elements (128 MiB;
# 192 rows at Qwen's 152k vocabulary). On CPU 256-1024 rows ran fastest at vocabularies of
# 4k-32k and widths of 64-512: fewer starve the matmuls and re-add the (vocab, D) weight
# gradient more often, more spill the logits out of cache. (Not yet measured on a GPU.)
CHUNK_ROWS = 512
CHUNK_LOGITS = 2**25
# Below this vocabulary the unfused formula runs. A CPU train step gained nothing at the tiny
# 365-token vocabulary (1.00x), 1.10x at 1024, 1.22x at 2048; 2048 keeps every run with the
# in-process tokenizer (1024 tokens at most by default) on the unfused path, bit for bit.
MIN_VOCAB = 2048


def chunk_rows(vocab: int) -> int:
    """The default rows per chunk: ``CHUNK_ROWS`` within ``CHUNK_LOGITS``, a multiple of 64."""
    return max(64, min(CHUNK_ROWS, CHUNK_LOGITS // vocab) // 64 * 64)


def fusable(head: nn.Module) -> bool:
    """A plain ``nn.Linear`` (not a LoRA/quantized subclass), at a vocabulary of at least
    ``MIN_VOCAB``, with no hooks its ``forward`` would run and its full weight in place (not a
    ZeRO-3 or FSDP shard gathered only inside ``forward``): the fused path reads the weight
    and bias and never calls ``forward``."""
    return (
        type(head) is nn.Linear
        and head.out_features >= MIN_VOCAB
        and head.weight.shape == (head.out_features, head.in_features)
        and not (head._forward_hooks or head._forward_pre_hooks)
    )


def head_cross_entropy(
    head: nn.Module, hidden: Tensor, targets: Tensor, weights: Tensor | None = None
) -> Tensor:
    """``LlavaModel``'s loss: mean cross-entropy of ``head(hidden)`` (N, vocab) against
    ``targets`` (N,), or with ``weights`` (N,) Σ ce·w / Σ w. Fused where :func:`fusable`."""
    if fusable(head):
        return linear_cross_entropy(hidden, head.weight, head.bias, targets, weights)
    logits = head(hidden).float()
    if weights is None:
        return F.cross_entropy(logits, targets, reduction="sum") / count(targets)
    loss = (F.cross_entropy(logits, targets, reduction="none") * weights).sum()
    return loss / weights.sum().clamp(min=1e-6)


def count(targets: Tensor) -> Tensor:
    """max(N, 1) as a tensor on the targets' device: dividing by it, not by a Python number
    (which a CPU kernel turns into a multiply by its reciprocal), keeps the loss's last bit."""
    return torch.full((), max(targets.numel(), 1), device=targets.device)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    weights: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``cross_entropy(hidden @ weight.T + bias, targets)``: the mean over the N rows, or with
    ``weights`` (N,) the weighted mean Σ ce·w / max(Σ w, 1e-6); 0 for N = 0. The matmuls run in
    the dtype ``nn.Linear`` would (autocast's, else ``hidden``'s), the softmax in fp32;
    gradients come back in the inputs' dtypes. ``chunk_size``: rows per chunk
    (default :func:`chunk_rows`)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    grad = torch.is_grad_enabled()
    needs = tuple(grad and t is not None and t.requires_grad for t in (hidden, weight, bias))
    if weights is None:
        norm = count(targets)
    else:
        weights = weights.float()
        norm = weights.sum().clamp(min=1e-6)
    chunk = chunk_size or chunk_rows(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, weights, norm, chunk, dtype, needs)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and the gradients for a loss gradient of 1; backward scales
    them by the actual one (the head's weight is not read again)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, norm, chunk, dtype, needs):  # noqa: PLR0913
        need_h, need_w, need_b = needs
        n, vocab = hidden.shape[0], weight.shape[0]
        f32 = torch.float32
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            # each row's share of the loss: what the unfused backward sends it (1/n, or w/Σw)
            inv = 1.0 / norm
            scale = inv.expand(n).float() if weights is None else inv * weights
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros_like(weight, dtype=f32) if need_w else None
            grad_b = torch.zeros_like(bias, dtype=f32) if need_b else None
            rows = min(chunk, n)  # two (rows, vocab) buffers, reused by every chunk
            z_buf = hidden.new_empty((rows, vocab), dtype=dtype)  # logits
            p_buf = hidden.new_empty((rows, vocab), dtype=f32) if dtype == f32 else None  # log-probs
            total = hidden.new_zeros((), dtype=f32)
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                x, t, sc = hidden[start:stop].to(dtype), targets[start:stop, None], scale[start:stop, None]
                z = z_buf[: stop - start]
                z = torch.mm(x, w.t(), out=z) if b is None else torch.addmm(b, x, w.t(), out=z)
                if p_buf is None:  # low precision: fp32 log-probs (fused with the cast on CUDA)
                    p = z.log_softmax(-1, dtype=f32)
                else:  # aten's out= variant: no fresh (rows, vocab) tensor per chunk
                    p = torch._log_softmax(z, -1, False, out=p_buf[: stop - start])
                ce = p.gather(1, t).squeeze(1).neg()
                total += ce.sum() if weights is None else (ce * weights[start:stop]).sum()
                if not any(needs):
                    continue
                # d loss / d logits = (softmax - one-hot) * share; the share scales the (rows, D)
                # operands instead of the (rows, vocab) one
                p = p.exp_().scatter_add_(1, t, torch.full_like(sc, -1.0))
                g = p if p_buf is not None else z.copy_(p)
                if need_h:
                    torch.mul(g @ w, sc, out=grad_h[start:stop])
                if need_w:
                    xs = (x * sc).to(dtype)
                    grad_w.addmm_(g.t(), xs) if grad_w.dtype == dtype else grad_w.add_(g.t() @ xs)
                if need_b:
                    grad_b.addmv_(p.t(), sc.squeeze(1))
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes, ctx.spent = (weight.dtype, None if bias is None else bias.dtype), False
        return total / norm

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        # scaled in place, so no second (vocab, D) buffer: a second backward would scale twice
        if ctx.spent:
            raise RuntimeError("the fused LM-head loss runs backward once (retain_graph is not supported)")
        ctx.spent = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        grad_h = None if grad_h is None else grad_h.mul_(grad_loss)
        grad_w = None if grad_w is None else grad_w.mul_(grad_loss).to(w_dtype)
        grad_b = None if grad_b is None else grad_b.mul_(grad_loss).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None
