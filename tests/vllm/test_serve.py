"""End to end: `vllm serve PACKED_DIR` (from .venv-vllm, with liftq's plugin) answers OpenAI
completion requests on 127.0.0.1 with the tokens and logprobs of the transformers path.

* smollm2-135m, quantized here with the cheapest settings (the test checks serving, not
  quality; `LIFTQ_VLLM_TEST_MODEL=out/packed` reuses a packed folder instead), is served on one
  rank traced by vLLM's torch.compile and on three eager (its 9 heads and 3 kv heads allow 1 or
  3): the greedy 32 tokens must be identical to `generate` in transformers and every logprob
  within LOGPROB_TOL.
* a tiny Llama with what smollm2 lacks: merged layers whose parts have different lattice
  configs (code rows of different widths), int4 embedding and lm_head stored once (tied), and
  4 ranks over 2 kv heads (vLLM replicates each kv head on two ranks). Its random weights make
  greedy ties likely, so it is checked on `prompt_logprobs` of a fixed sequence instead.
* tiny Gemma 3 and Gemma 4 (sliding and full layers) and Phi-3, whose file stores `qkv_proj`
  and `gate_up_proj` fused where vLLM merges parts (on 4 ranks: each rank's q, k and v rows
  gathered from the one fused tensor), checked the same way.

Needs `make vllm-setup` (.venv-vllm). Without it the tests skip locally; under CI (`CI` or
`LIFTQ_REQUIRE_VLLM` set, as .ci/run does) they fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bench.vllm_serving import vllm_server
from tests.helpers import run_liftq as liftq

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("need_vllm")]

LOGPROB_TOL = 1e-3  # nats; measured: 8e-6 on 1 rank, 6e-6 on 3 (float32 on CPU)
NEW_TOKENS = 32
PROMPT = "The capital of France is"


def transformers_greedy(folder: Path, prompt: str, new_tokens: int) -> dict:
    """Greedy tokens and their logprobs from `from_pretrained(folder)` (liftq's runtime)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import liftq_cli  # noqa: F401  (registers liftquant with transformers)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(ids) :].tolist()
    logprobs = [
        torch.log_softmax(step[0].float(), -1)[t].item()
        for step, t in zip(out.logits, tokens, strict=True)
    ]
    return {"prompt": ids, "tokens": tokens, "logprobs": logprobs}


def served_greedy(server, prompt: str, new_tokens: int) -> dict:
    """The same request as an OpenAI client sends: POST /v1/completions, greedy, logprobs."""
    reply = server.post(
        "/v1/completions",
        {
            "model": server.model,
            "prompt": prompt,
            "max_tokens": new_tokens,
            "min_tokens": new_tokens,
            "temperature": 0,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
        },
    )
    choice = reply["choices"][0]
    tokens = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
    return {
        "tokens": tokens,
        "logprobs": choice["logprobs"]["token_logprobs"],
        "text": choice["text"],
    }


def assert_same_generation(served: dict, reference: dict) -> None:
    assert len(reference["tokens"]) == NEW_TOKENS
    assert served["tokens"] == reference["tokens"]
    diff = max(abs(a - b) for a, b in zip(served["logprobs"], reference["logprobs"], strict=True))
    assert diff < LOGPROB_TOL, f"logprobs differ by {diff:.2e} nats"


@pytest.fixture(scope="module")
def smollm2_reference(packed_smollm2) -> dict:
    return transformers_greedy(packed_smollm2, PROMPT, NEW_TOKENS)


@pytest.mark.parametrize(
    ("ranks", "eager"),
    [(1, False), (3, True)],
    ids=["1-rank-torch.compile", "3-ranks-eager"],
)
def test_vllm_serves_packed_smollm2_like_transformers(
    packed_smollm2, smollm2_reference, ranks, eager, tmp_path
):
    config = json.loads((packed_smollm2 / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "liftquant"
    log = tmp_path / "serve.log"
    with vllm_server(packed_smollm2, log, tensor_parallel=ranks, eager=eager) as server:
        models = server.get("/v1/models")
        assert [m["id"] for m in models["data"]] == [str(packed_smollm2)]
        served = served_greedy(server, PROMPT, NEW_TOKENS)
    text = log.read_text(errors="replace")
    assert "quantization=liftquant" in text  # served through the plugin, not unquantized
    if not eager:  # vLLM traced the model (torch.ops.liftq.linear inside) with torch.compile
        assert "CompilationMode.NONE" not in text and "enforce_eager=False" in text
    assert_same_generation(served, smollm2_reference)
    assert served["text"]  # decoded by the server's tokenizer
    assert server.stop_seconds is not None and server.stop_seconds < 60


# --- the tiny model: mixed widths in merged layers, int4 tied embedding, kv replicas -------

TINY_CONFIGS = {
    # Rows of 128 inputs hold 7 words at LQ-8/5 and 9 at LQ-9/4: the parts of qkv_proj and of
    # gate_up_proj differ in width. On 4 ranks o_proj's 7 words leave two ranks empty.
    "q_proj": "LQ-8/5",
    "k_proj": "LQ-9/4",
    "v_proj": "LQ-8/5",
    "o_proj": "LQ-8/5",
    "gate_proj": "LQ-9/4",
    "up_proj": "LQ-8/5",
    "down_proj": "LQ-9/4",
}


def build_tiny(root: Path) -> Path:
    """A 2-layer Llama (hidden 128, 4 heads of 32, 2 kv heads), quantized by the real pipeline
    with exhaustive encoding, tied, packed with int4 embedding and lm_head."""
    from safetensors.torch import load_file, save_file
    from tests.quant.test_encode import brute_force_encode, tiny_matrix
    from tests.runtime.tiny_packed import one_thread, save_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from liftq_cli.io.quantized import UNQUANTIZED_FILE, write_quantized
    from liftq_cli.io.workdir import WorkDir
    from liftq_cli.lattice_config import LatticeConfig
    from liftq_cli.quant.blocks import quantize_blocks
    from liftq_cli.quantize_job import CorrectionConfig, QuantizeSettings

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
        tie_word_embeddings=False,
    )  # fmt: skip
    fp, work, quant = root / "fp", root / "work", root / "quant"
    LlamaForCausalLM(config).save_pretrained(fp)
    save_tokenizer(fp)
    configs = {key: LatticeConfig.parse(name) for key, name in TINY_CONFIGS.items()}
    matrices = {cfg: tiny_matrix(cfg.D, cfg.d) for cfg in set(configs.values())}
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    settings = QuantizeSettings(whiten_steps=0, correction=CorrectionConfig(steps=0))
    with one_thread():
        quantize_blocks(
            fp,
            lambda _layer, kind: configs[kind.rpartition(".")[2]],
            ids,
            WorkDir(work),
            matrices.__getitem__,
            brute_force_encode,
            settings,
            {"t": "vllm"},
        )
        write_quantized(fp, WorkDir(work), quant, 2, matrices.__getitem__, {"job": "tiny"}, "")
    # tied, as transformers saves a tied model: the flag and no lm_head.weight
    meta = json.loads((quant / "config.json").read_text())
    meta["tie_word_embeddings"] = True
    (quant / "config.json").write_text(json.dumps(meta, indent=2))
    tensors = load_file(quant / UNQUANTIZED_FILE)
    del tensors["lm_head.weight"]
    save_file(tensors, str(quant / UNQUANTIZED_FILE), {"format": "pt"})
    packed = root / "packed"
    liftq("pack", str(quant), "--out", str(packed), "--embed", "int4", "--lm-head", "int4")
    return packed


def transformers_prompt_logprobs(folder: Path, ids: list[int]) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 from the transformers path."""
    from transformers import AutoModelForCausalLM

    import liftq_cli  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], -1)
    return logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()


def served_prompt_logprobs(packed: Path, log: Path, ids: list[int], ranks: int) -> list[float]:
    with vllm_server(packed, log, tensor_parallel=ranks, max_model_len=128) as server:
        reply = server.post(
            "/v1/completions",
            {"model": server.model, "prompt": ids, "max_tokens": 1, "temperature": 0,
             "prompt_logprobs": 0},
        )  # fmt: skip
    assert server.stop_seconds is not None and server.stop_seconds < 60
    entries = reply["choices"][0]["prompt_logprobs"]
    assert entries[0] is None  # the first token has no context
    return [entry[str(token)]["logprob"] for entry, token in zip(entries[1:], ids[1:], strict=True)]


OTHER_DECODERS = [("gemma3_text", 1), ("gemma4_text", 2), ("phi3", 4)]  # (model_type, ranks)


def pack_tiny_decoder(tmp_path: Path, model_type: str) -> Path:
    """A tiny random `model_type` decoder, quantized at LQ-8/4 without correction, packed."""
    from tests.quant.test_encode import brute_force_encode, tiny_matrix
    from tests.quant.tiny_decoders import SUPPORTED, save_tiny
    from tests.runtime.tiny_packed import one_thread, save_tokenizer

    from liftq_cli.io.packed import pack_quantized
    from liftq_cli.io.quantized import write_quantized
    from liftq_cli.io.workdir import WorkDir
    from liftq_cli.lattice_config import LatticeConfig
    from liftq_cli.quant.blocks import quantize_blocks
    from liftq_cli.quant.decoder import checkpoint_reader
    from liftq_cli.quantize_job import CorrectionConfig, QuantizeSettings

    cfg, matrix = LatticeConfig(8, 4), tiny_matrix(8, 4)
    # head_dim 32: vLLM's CPU attention has no kernel for the unit tests' 16
    fp = save_tiny(tmp_path / "fp", model_type, {**SUPPORTED[model_type], "head_dim": 32})
    save_tokenizer(fp)
    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    settings = QuantizeSettings(whiten_steps=0, correction=CorrectionConfig(steps=0))
    work, quant, packed = tmp_path / "work", tmp_path / "quant", tmp_path / "packed"
    with one_thread():
        quantize_blocks(
            fp, lambda *_: cfg, ids, WorkDir(work), lambda _c: matrix, brute_force_encode,
            settings, {"t": model_type},
        )  # fmt: skip
        reader = checkpoint_reader(fp)  # experts unfused
        write_quantized(fp, WorkDir(work), quant, 2, lambda _c: matrix, {}, "", None, reader)
    pack_quantized(quant, packed, embed="fp16", lm_head="fp16")
    return packed


@pytest.mark.parametrize(("model_type", "ranks"), OTHER_DECODERS)
def test_vllm_serves_other_decoders_like_transformers(tmp_path, model_type, ranks):
    packed = pack_tiny_decoder(tmp_path, model_type)
    prompt = torch.randint(3, 64, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = transformers_prompt_logprobs(packed, prompt)
    served = served_prompt_logprobs(packed, tmp_path / "serve.log", prompt, ranks)
    diff = max(abs(a - b) for a, b in zip(served, reference, strict=True))
    assert diff < LOGPROB_TOL, f"{model_type}: prompt logprobs differ by {diff:.2e} nats"


def test_vllm_serves_mixed_widths_int4_tied_on_four_ranks(tmp_path):
    packed = build_tiny(tmp_path)
    qc = json.loads((packed / "config.json").read_text())["quantization_config"]
    assert (qc["embed"], qc["lm_head"], qc["tied"]) == ("int4", "int4", True)
    ids = torch.randint(2, 64, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = transformers_prompt_logprobs(packed, ids)
    served = served_prompt_logprobs(packed, tmp_path / "serve.log", ids, 4)
    diff = max(abs(a - b) for a, b in zip(served, reference, strict=True))
    assert diff < LOGPROB_TOL, f"prompt logprobs differ by {diff:.2e} nats"


def test_vllm_refuses_a_packed_mixture_of_experts_model_naming_the_layer(tmp_path):
    packed = pack_tiny_decoder(tmp_path, "qwen3_moe")
    log_path = tmp_path / "serve.log"
    with (
        pytest.raises(RuntimeError) as failed,
        vllm_server(packed, log_path, tensor_parallel=1, max_model_len=128),
    ):
        pass
    log = log_path.read_text()
    assert "exited with" in str(failed.value)
    assert "liftquant: model.layers.0.mlp.experts holds mixture-of-experts experts" in log
