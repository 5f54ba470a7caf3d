"""The fused, chunked LM head + cross-entropy gives the unfused loss and gradients (hidden
states, head weight, bias; a tied embedding matrix gets both its uses), for any chunking, with
and without loss weights, a frozen head and no targets; ``LlavaModel`` uses it where it fuses."""

import pytest
import torch
import torch.nn.functional as F
from test_llava_core import batch_of, make

from vlm.core import fused_ce
from vlm.core.fused_ce import fusable, head_cross_entropy, linear_cross_entropy
from vlm.core.tokenizer import IGNORE_INDEX, train_tokenizer
from vlm.core.zoo.llms import build_llm

TOL = {"rtol": 1e-5, "atol": 1e-6}


def unfused(hidden, weight, bias, targets, weights=None):
    """``LlavaModel``'s loss as it was before fusing."""
    logits = F.linear(hidden, weight, bias).float()
    if weights is None:
        return F.cross_entropy(logits, targets, reduction="sum") / (targets != IGNORE_INDEX).sum().clamp(
            min=1
        )
    return (F.cross_entropy(logits, targets, reduction="none") * weights).sum() / weights.sum().clamp(
        min=1e-6
    )


def loss_and_grads(fn, hidden, weight, bias, *args, **kwargs):
    leaves = [
        t.detach().clone().requires_grad_(t.requires_grad) for t in (hidden, weight, bias) if t is not None
    ]
    h, w, b = leaves if bias is not None else [*leaves, None]
    loss = fn(h, w, b, *args, **kwargs)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def problem(n=37, d=16, vocab=50, bias=False, weighted=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(vocab, d, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(vocab, generator=g)).requires_grad_() if bias else None
    targets = torch.randint(vocab, (n,), generator=g)
    weights = torch.rand(n, generator=g) * 3 if weighted else None
    return hidden, weight, b, targets, weights


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [None, 1, 8, 37, 64])  # ragged tail (37 = 4 x 8 + 5), one row, one chunk
def test_loss_and_gradients_equal_the_unfused_ones(weighted, bias, chunk):
    hidden, weight, b, targets, weights = problem(bias=bias, weighted=weighted)
    ref, ref_grads = loss_and_grads(unfused, hidden, weight, b, targets, weights)
    loss, grads = loss_and_grads(linear_cross_entropy, hidden, weight, b, targets, weights, chunk_size=chunk)
    torch.testing.assert_close(loss, ref, **TOL)
    assert len(grads) == len(ref_grads) == (3 if bias else 2)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **TOL)


def test_a_frozen_head_gets_no_gradient():
    hidden, weight, _, targets, _ = problem()
    weight.requires_grad_(False)
    ref, (ref_h, ref_w) = loss_and_grads(unfused, hidden, weight, None, targets)
    loss, (g_h, g_w) = loss_and_grads(linear_cross_entropy, hidden, weight, None, targets, chunk_size=8)
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(g_h, ref_h, **TOL)
    assert ref_w is None and g_w is None


def test_the_gradient_is_scaled_by_the_losss_gradient():
    hidden, weight, _, targets, weights = problem(weighted=True)
    _, grads = loss_and_grads(linear_cross_entropy, hidden, weight, None, targets, weights, chunk_size=8)
    _, scaled = loss_and_grads(
        lambda *a, **k: 3.0 * linear_cross_entropy(*a, **k),
        hidden,
        weight,
        None,
        targets,
        weights,
        chunk_size=8,
    )
    for g, s in zip(grads, scaled, strict=True):
        torch.testing.assert_close(s, 3.0 * g, **TOL)


@pytest.mark.parametrize("weighted", [False, True])
def test_no_targets_is_a_zero_loss_and_zero_gradients(weighted):
    hidden, weight, _, targets, weights = problem(n=0, weighted=weighted)
    loss, (g_h, g_w) = loss_and_grads(linear_cross_entropy, hidden, weight, None, targets, weights)
    ref, _ = loss_and_grads(unfused, hidden, weight, None, targets, weights)
    assert loss.item() == ref.item() == 0.0
    assert g_h.shape == (0, 16) and torch.equal(g_w, torch.zeros_like(g_w))


def test_without_grad_mode_it_only_computes_the_loss():
    hidden, weight, _, targets, weights = problem(weighted=True)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, None, targets, weights, chunk_size=8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, unfused(hidden, weight, None, targets, weights).detach(), **TOL)


def test_under_autocast_the_matmuls_run_low_and_gradients_keep_the_inputs_dtypes():
    """As ``nn.Linear`` under autocast: bf16 logits, an fp32 softmax; fp32 leaves get fp32
    gradients, and a bf16 frozen head with bf16 hidden states gives bf16 ones."""
    hidden, weight, _, targets, _ = problem(n=40, d=32, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = loss_and_grads(unfused, hidden, weight, None, targets)
        loss, grads = loss_and_grads(linear_cross_entropy, hidden, weight, None, targets, chunk_size=16)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-4)  # bf16 rounding of chunked products
    h, w = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, None, targets, chunk_size=16)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16


def test_tied_embeddings_accumulate_both_uses_into_one_parameter():
    """A tiny Llama with tied embeddings: the head's gradient and the input embedding's land in
    the same Parameter, as in the unfused graph."""
    vocab = 96
    grads, losses = [], []
    for fn in (unfused, linear_cross_entropy):
        torch.manual_seed(0)
        llm = build_llm("tiny_llama", vocab_size=vocab, tie_word_embeddings=True)
        head = llm.get_output_embeddings()
        assert head.weight is llm.get_input_embeddings().weight
        ids = torch.randint(vocab, (2, 12), generator=torch.Generator().manual_seed(1))
        hidden = llm.base_model(input_ids=ids, use_cache=False).last_hidden_state
        loss = fn(
            hidden[:, :-1].reshape(-1, hidden.shape[-1]), head.weight, head.bias, ids[:, 1:].reshape(-1)
        )
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in llm.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], **TOL)
    assert grads[0].keys() == grads[1].keys() and "model.embed_tokens.weight" in grads[1]
    for name, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][name], **TOL, msg=name)


def test_only_a_plain_linear_head_at_a_large_vocabulary_fuses(monkeypatch):
    monkeypatch.setattr(fused_ce, "MIN_VOCAB", 100)
    assert fusable(torch.nn.Linear(8, 100, bias=False)) and not fusable(torch.nn.Linear(8, 99))

    class Wrapped(torch.nn.Linear):  # a LoRA / quantized layer's forward is not W x + b
        pass

    assert not fusable(Wrapped(8, 100))
    hooked = torch.nn.Linear(8, 100)
    hooked.register_forward_hook(lambda *_: None)
    assert not fusable(hooked)
    sharded = torch.nn.Linear(8, 100)  # ZeRO-3 leaves an empty tensor outside forward
    sharded.weight.data = torch.empty(0)
    assert not fusable(sharded)


def test_a_second_backward_is_refused():
    hidden, weight, _, targets, _ = problem()
    loss = linear_cross_entropy(hidden, weight, None, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs backward once"):
        loss.backward()


@pytest.fixture(scope="module")
def tokenizer():
    conv = ["What color is the circle?", "red", "Is there a square?", "no"]
    return train_tokenizer(conv * 4, vocab_size=200)


@pytest.mark.parametrize("weighted", [False, True])
def test_llava_forward_fuses_and_gives_the_previous_loss(tokenizer, monkeypatch, weighted):
    """Through ``LlavaModel.forward``: the fused loss (fusing forced at this tiny vocabulary)
    equals the unfused formula on the model's own hidden states, gradients included."""
    monkeypatch.setattr(fused_ce, "MIN_VOCAB", 0)
    calls = []
    fused = fused_ce.linear_cross_entropy
    monkeypatch.setattr(fused_ce, "linear_cross_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k))
    model, proc = make(tokenizer)
    batch = batch_of(proc)
    args = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    weights = (
        torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(0)) if weighted else None
    )
    out = model(**args, loss_weights=weights)
    assert calls == [1] and set(out) == {"loss", "n_targets"}
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
    hidden = model.llm.base_model(
        inputs_embeds=embeds,
        attention_mask=batch["attention_mask"],
        position_ids=model.image_positions.position_ids(batch["input_ids"], batch["attention_mask"]),
        use_cache=False,
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    head = model.llm.get_output_embeddings()
    w = None if weights is None else weights[:, 1:][keep]
    ref = unfused(hidden[:, :-1][keep], head.weight, head.bias, targets[keep], w)
    ref.backward()
    assert out["n_targets"] == keep.sum() > 0
    torch.testing.assert_close(out["loss"], ref, **TOL)
    for name, g in grads.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[name].grad, **TOL, msg=name)


def test_head_cross_entropy_below_the_vocabulary_threshold_is_the_unfused_formula(tokenizer):
    head = torch.nn.Linear(16, 50, bias=False)
    hidden, _, _, targets, weights = problem(weighted=True)
    for w in (None, weights):
        assert torch.equal(
            head_cross_entropy(head, hidden, targets, w), unfused(hidden, head.weight, None, targets, w)
        )
