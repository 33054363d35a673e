import copy
import json

import pytest
import torch
import torch.nn.functional as F
from tests.evaluate.test_perplexity import tiny_llama
from tests.helpers import assert_one_line_error
from transformers import LlamaConfig, LlamaForCausalLM

from liftq_cli.errors import BadInputError
from liftq_cli.evaluate.divergence import divergence
from liftq_cli.evaluate.perplexity import perplexity


def ids(n: int = 1000, vocab: int = 97) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1))


def perturbed(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=generator))
    return other


def reference_kl(model, ref, tokens: torch.Tensor, ctx: int) -> tuple[float, float]:
    """Independent: torch's kl_div and argmax on each window, one window at a time."""
    total, agree, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(tokens.numel() // ctx):
            window = tokens[i * ctx : (i + 1) * ctx].unsqueeze(0)
            log_q = model(window).logits[0, :-1].double().log_softmax(-1)
            log_p = ref(window).logits[0, :-1].double().log_softmax(-1)
            total += float(F.kl_div(log_q, log_p, log_target=True, reduction="sum"))
            agree += int((log_q.argmax(-1) == log_p.argmax(-1)).sum())
            count += ctx - 1
    return total / count, agree / count


def test_a_model_against_itself_has_zero_kl_and_full_agreement():
    model = tiny_llama()
    ppl, div = divergence(model, model, ids(), ctx=128, batch_size=3)
    assert div.kl_mean == 0.0 and div.kl_max == 0.0
    assert div.top1_agreement == 1.0
    assert div.ref_ppl == ppl.ppl
    assert div.tokens_scored == ppl.tokens_scored == 7 * 127


def test_a_perturbed_copy_diverges_and_matches_an_independent_computation():
    model = tiny_llama()
    noisy = perturbed(model, 0.5)
    _, div = divergence(noisy, model, ids(), ctx=128, batch_size=2)
    kl, agree = reference_kl(noisy, model, ids(), ctx=128)
    assert div.kl_mean > 1e-3
    assert div.kl_mean == pytest.approx(kl, rel=1e-4)
    assert div.top1_agreement == pytest.approx(agree, abs=1e-9)
    assert div.top1_agreement < 1.0
    assert div.kl_max >= div.kl_mean


def test_kl_grows_with_the_perturbation():
    model = tiny_llama()
    small = divergence(perturbed(model, 0.05), model, ids(), ctx=128)[1].kl_mean
    large = divergence(perturbed(model, 0.5), model, ids(), ctx=128)[1].kl_mean
    assert 0 < small < large


@pytest.mark.parametrize("bos_id", [None, 5])
def test_perplexity_from_the_same_pass_equals_perplexity(bos_id):
    model, ref = tiny_llama(), tiny_llama(seed=3)
    ppl, div = divergence(model, ref, ids(), ctx=100, bos_id=bos_id, batch_size=4)
    expected = perplexity(model, ids(), ctx=100, bos_id=bos_id, batch_size=4)
    assert ppl == expected  # every field, bit for bit
    assert div.ref_ppl == perplexity(ref, ids(), ctx=100, bos_id=bos_id).ppl
    assert div.bos is (bos_id is not None)


def test_a_reference_with_another_vocabulary_is_refused():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    other = LlamaForCausalLM(config).eval()
    with pytest.raises(BadInputError, match="--kld-ref predicts 50 tokens but the model 97"):
        divergence(tiny_llama(), other, ids(vocab=50), ctx=64)


def test_ctx_beyond_the_reference_context_is_refused():
    with pytest.raises(BadInputError, match="exceeds the context of the model"):
        divergence(tiny_llama(), tiny_llama(), ids(2000), ctx=512)


@pytest.fixture
def tiny_folders(tmp_path, tokenizer):
    """Two tiny Llamas on SmolLM2's tokenizer, saved as HF folders: base and perturbed."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    base = LlamaForCausalLM(config).eval()
    folders = {}
    for name, model in (("base", base), ("noisy", perturbed(base, 0.3))):
        folders[name] = tmp_path / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    return folders, text


def test_eval_kld_ref_json(cli, tiny_folders):
    folders, text = tiny_folders
    args = ["eval", str(folders["noisy"]), "--ppl", str(text), "--ctx", "64"]
    args += ["--max-tokens", "256", "--json"]
    result = cli(*args, "--kld-ref", str(folders["base"]))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["kld_ref"] == str(folders["base"])
    kld = payload["kld"]["text.txt"]
    assert kld["kl_mean"] > 0 and 0 <= kld["top1_agreement"] < 1
    assert kld["tokens_scored"] == payload["results"]["text.txt"]["tokens_scored"]
    # Without --kld-ref the perplexity is the same number and the JSON has no kld fields.
    plain = json.loads(cli(*args).stdout)
    assert plain["ppl"] == payload["ppl"] and "kld" not in plain
    same = json.loads(cli(*args, "--kld-ref", str(folders["noisy"])).stdout)["kld"]["text.txt"]
    assert same["kl_mean"] == 0.0 and same["top1_agreement"] == 1.0


def test_eval_kld_ref_table(cli, tiny_folders):
    folders, text = tiny_folders
    result = cli(
        "eval", str(folders["noisy"]), "--ppl", str(text), "--ctx", "64", "--max-tokens", "128",
        "--kld-ref", str(folders["base"]),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "top-1 agree" in result.stdout and "KL(ref || model)" in result.stdout


def test_eval_kld_ref_with_another_tokenizer_is_one_line(cli, tiny_folders, tmp_path):
    folders, text = tiny_folders
    from liftq_cli.io.checkpoints import load_tokenizer

    other = load_tokenizer(folders["base"])
    other.add_tokens(["<liftq-extra-token>"])
    other.save_pretrained(folders["base"])
    result = cli(
        "eval", str(folders["noisy"]), "--ppl", str(text), "--ctx", "128",
        "--kld-ref", str(folders["base"]),
    )  # fmt: skip
    assert_one_line_error(result, "--kld-ref", "different tokenizer vocabulary")
