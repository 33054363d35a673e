import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from liftq_cli.data.calibration import tokenize
from liftq_cli.data.text import load_wikitext2
from liftq_cli.errors import BadInputError
from liftq_cli.evaluate.perplexity import make_windows, perplexity


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def reference_ppl(model, ids: torch.Tensor, ctx: int) -> float:
    """Independent computation: transformers' own shifted loss, window by window."""
    n = ids.numel() // ctx
    losses = []
    with torch.no_grad():
        for i in range(n):
            window = ids[i * ctx : (i + 1) * ctx].unsqueeze(0)
            losses.append(float(model(window, labels=window).loss))
    return math.exp(sum(losses) / len(losses))


def test_windows_are_non_overlapping_and_drop_the_remainder():
    ids = torch.arange(10)
    windows = make_windows(ids, 4)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with_bos = make_windows(ids, 4, bos_id=99)
    assert with_bos.tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]


@pytest.mark.parametrize("ctx", [1, 0, -5])
def test_ctx_below_two_is_refused(ctx):
    with pytest.raises(BadInputError, match=f"--ctx {ctx} is too small"):
        make_windows(torch.arange(100), ctx)


def test_too_few_tokens_is_refused():
    with pytest.raises(BadInputError, match="fewer than one window"):
        make_windows(torch.arange(10), 64)


def test_matches_transformers_loss_on_a_tiny_model():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1000,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, ctx=128, batch_size=3)
    assert result.windows == 7 and result.tokens == 896 and result.tokens_scored == 7 * 127
    assert result.ppl == pytest.approx(reference_ppl(model, ids, 128), rel=1e-5)
    # An untrained model on uniform tokens sits near the vocabulary size.
    assert 60 < result.ppl < 140


def test_ctx_beyond_the_model_is_refused():
    with pytest.raises(BadInputError, match="exceeds the model's context of 256"):
        perplexity(tiny_llama(), torch.arange(600) % 97, ctx=512)


@pytest.mark.slow
def test_real_model_matches_an_independent_gguf_computation(smollm2):
    """Our pipeline (cached fp32 folder) vs transformers reading the GGUF directly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from liftq_cli.io.checkpoints import _alias_gguf

    ids = tokenize(smollm2.tokenizer, load_wikitext2().text)[:2048]
    ours = perplexity(smollm2.model, ids, ctx=1024)
    gguf = _alias_gguf("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    rows = load_wikitext2().text
    ref_ids = torch.tensor(tok(rows, add_special_tokens=False)["input_ids"][:2048])
    assert torch.equal(ref_ids, ids)
    assert ours.ppl == pytest.approx(reference_ppl(direct, ref_ids, 1024), rel=1e-4)
    # The published fp32 value at 40k tokens is ~24; two windows land close to it.
    assert 18 < ours.ppl < 30
