"""The one decoder-injection mechanism (``vlm.core.injection``): hooks on the chosen layers
only, inert without a context, the whole LLM path (kwargs or args) rewritten, beams expanded,
and gone after ``detach``."""

import pytest
import torch

from vlm.core.injection import DecoderInjection, per_beam
from vlm.core.zoo.llms import build_llm, decoder_layers

pytestmark = pytest.mark.usefixtures("single_thread")


class AddContext(DecoderInjection):
    """Adds the context vector (B, D) to every position of the hooked layers' input."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def inject(self, layer, hidden):
        self.calls.append(layer)
        return hidden + per_beam(self.context, hidden, len(self.context))[:, None]


@pytest.fixture
def llm():
    torch.manual_seed(0)
    return build_llm("tiny_llama", vocab_size=64).eval()


def logits(llm, ids):
    with torch.no_grad():
        return llm(input_ids=ids).logits


def test_hooks_run_on_the_targets_only_with_a_context_and_are_gone_after_detach(llm):
    ids = torch.randint(1, 64, (2, 5))
    plain = logits(llm, ids)
    layers = decoder_layers(llm)
    inj = AddContext()
    inj.attach(layers, [1, 0, 1])  # repeats hook once
    inj.attach(layers, [1, 0])  # attaching again replaces the hooks
    assert [len(layer._forward_pre_hooks) for layer in layers] == [1, 1] + [0] * (len(layers) - 2)
    assert torch.equal(logits(llm, ids), plain) and inj.calls == []  # no context: the plain LLM
    inj.set_context(torch.randn(2, llm.config.hidden_size))
    fused = logits(llm, ids)
    assert not torch.allclose(fused, plain, atol=1e-4) and sorted(inj.calls) == [0, 1]
    inj.clear()
    assert torch.equal(logits(llm, ids), plain)
    inj.set_context(torch.randn(2, llm.config.hidden_size))
    inj.detach()
    assert all(not layer._forward_pre_hooks for layer in layers)
    assert torch.equal(logits(llm, ids), plain)


def test_beam_search_rows_read_their_own_prompts_context(llm):
    inj = AddContext()
    inj.attach(decoder_layers(llm), [0])
    context = torch.randn(2, llm.config.hidden_size)
    hidden = torch.zeros(6, 3, llm.config.hidden_size)  # 2 prompts x 3 beams
    inj.set_context(context)
    out = inj.inject(0, hidden)
    assert torch.equal(out[:3, 0], context[:1].expand(3, -1)) and torch.equal(
        out[3:, 2], context[1:].expand(3, -1)
    )
    ids = torch.randint(1, 64, (2, 4))
    beams = llm.generate(input_ids=ids, max_new_tokens=3, num_beams=3, do_sample=False, pad_token_id=0)
    assert beams.shape[0] == 2  # generate() ran through the hook with 6 rows per layer call
