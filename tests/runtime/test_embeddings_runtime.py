"""A packed model loads with every --embed / --lm-head choice and computes what it stores.

Logits against the fp16 / fp16 pack of the same checkpoint, relative Frobenius error over a
batch: `host` is the same fp16 table, so it adds nothing (bit for bit); int8 adds at most 1e-2
per part and int4 at most 0.15 per part (round-to-nearest codes of a random 48-wide matrix:
half a step of max|w|/127 or max|w|/7 per weight; measured about 0.6% and 11-12%).
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from tests.runtime.tiny_packed import one_thread, quant_dir, tied_quant_dir

from liftq_cli.errors import BadInputError
from liftq_cli.io.embedding_format import EMBED_CHOICES, LM_HEAD_CHOICES, EmbeddingLayout
from liftq_cli.io.packed import pack_quantized
from liftq_cli.runtime.embeddings import (
    HostEmbedding,
    QuantEmbedding,
    QuantLMHead,
    replace_embeddings,
)
from liftq_kernels.qlinear_ref import dequantize, quantize_int4, quantize_int8

BOUND = {"fp16": 0.0, "host": 0.0, "int8": 1e-2, "int4": 0.15}
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
COMBOS = list(itertools.product(EMBED_CHOICES, LM_HEAD_CHOICES))


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A function (tied, embed, lm_head) -> packed folder, each packed once."""
    root = tmp_path_factory.getbasetemp() / "tiny"
    sources = {False: quant_dir(root), True: tied_quant_dir(root)}
    out_root = tmp_path_factory.mktemp("runtime-embeddings")
    done = {}

    def get(tied: bool, embed: str, lm_head: str):
        if (tied, embed, lm_head) not in done:
            out = out_root / f"{int(tied)}-{embed}-{lm_head}"
            pack_quantized(sources[tied], out, embed=embed, lm_head=lm_head)
            done[tied, embed, lm_head] = out
        return done[tied, embed, lm_head]

    return get


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


KINDS = {"fp16": torch.nn.Embedding, "host": HostEmbedding, "int8": QuantEmbedding}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(("embed", "lm_head"), COMBOS)
def test_each_choice_loads_and_tracks_the_fp16_pack(packed, tied, embed, lm_head):
    reference = logits(load(packed(tied, "fp16", "fp16")))
    model = load(packed(tied, embed, lm_head))
    embedding, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embedding, KINDS.get(embed, QuantEmbedding))
    assert isinstance(head, torch.nn.Linear if lm_head == "fp16" else QuantLMHead)
    if isinstance(head, QuantLMHead):
        assert (head.shared is embedding) is (tied and embed == lm_head)
    got = logits(model)
    err = float((got - reference).norm() / reference.norm())
    if BOUND[embed] + BOUND[lm_head] == 0:
        assert torch.equal(got, reference)
    else:
        assert err < BOUND[embed] + BOUND[lm_head], err


def test_the_modules_compute_with_their_stored_tensors(packed):
    model = load(packed(False, "int4", "int8"))
    embedding, head = model.model.embed_tokens, model.lm_head
    table = embedding.dequantize()
    assert torch.equal(embedding(IDS), table[IDS])
    x = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(0))
    expected = x @ head.dequantize().T
    assert float((head(x) - expected).norm() / expected.norm()) < 1e-5


def test_a_tied_pair_stored_once_saves_and_reloads(packed, tmp_path):
    folder = packed(True, "int8", "int8")
    model = load(folder)
    assert not [n for n, _ in model.named_buffers() if n.startswith("lm_head.")]
    before = logits(model)
    model.save_pretrained(tmp_path / "resaved")
    again = load(tmp_path / "resaved")
    assert again.lm_head.shared is again.model.embed_tokens
    assert torch.equal(logits(again), before)
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert config["quantization_config"]["tied"] is True


def test_host_embedding_stays_on_the_host_and_follows_the_compute_dtype():
    torch.manual_seed(0)
    table = torch.randn(10, 6).half()
    module = HostEmbedding(10, 6, torch.float32)
    module.weight = table
    module.to(torch.float64)  # a dtype change reaches the rows, not the stored table
    ids = torch.tensor([[1, 9, 1]])
    rows = module(ids)
    assert rows.dtype == torch.float64 and tuple(rows.shape) == (1, 3, 6)
    assert torch.equal(rows, table[ids].double())
    module.to("meta")  # a device move leaves the table where it is
    assert module.weight.device.type == "cpu" and module.weight.dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_embedding_on_a_cuda_model_is_pinned_and_copies_rows_over(packed):
    model = load(packed(False, "host", "int8")).to("cuda")
    embedding = model.model.embed_tokens
    assert embedding.weight.device.type == "cpu" and embedding.weight.is_pinned()
    ids = IDS.to("cuda")
    rows = embedding(ids)
    assert rows.device.type == "cuda"
    assert torch.equal(rows.cpu(), embedding.weight[IDS].to(rows.dtype))
    assert torch.isfinite(model(ids).logits).all()


def test_quant_embedding_gathers_only_the_rows_asked_for():
    w = torch.randn(20, 33, generator=torch.Generator().manual_seed(1))
    for precision, (q, s) in {"int8": quantize_int8(w), "int4": quantize_int4(w, 16)}.items():
        module = QuantEmbedding(20, 33, precision, 16)
        module.qweight, module.qscale = q, s
        ids = torch.tensor([3, 3, 19, 0])
        assert torch.equal(module(ids), dequantize(q, s, 33, 16)[ids])


def test_a_module_of_another_kind_is_refused_in_one_line():
    class Scaled(torch.nn.Embedding):
        pass

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.embed_tokens = Scaled(10, 4)
    with pytest.raises(BadInputError, match="Scaled, not a plain nn.Embedding.*--embed fp16"):
        replace_embeddings(model, EmbeddingLayout("int8", "fp16"))
