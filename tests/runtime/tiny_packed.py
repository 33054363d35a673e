"""A tiny quantized checkpoint built by the real pipeline (no whitening or correction steps).

Two configs on purpose: attention at LQ-8/5 and the MLP at LQ-9/4, so the file holds two
lattice matrices; hidden 48 and intermediate 96 give d = 5 slices that do not divide the
inputs and rows of 80 / 90 / 180 code bits (not multiples of 32).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tests.quant.test_encode import brute_force_encode, tiny_matrix
from transformers import LlamaConfig, LlamaForCausalLM

from liftq_cli.io.quantized import write_quantized
from liftq_cli.io.workdir import WorkDir
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.blocks import quantize_blocks
from liftq_cli.quantize_job import CorrectionConfig, QuantizeSettings

ATTN = LatticeConfig(8, 5)
MLP = LatticeConfig(9, 4)
MATRICES = {ATTN: tiny_matrix(8, 5), MLP: tiny_matrix(9, 4)}
LAYERS = 2
_BUILT: dict[Path, Path] = {}


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded: on tiny tensors thread hand-offs cost more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def config_for(_layer: int, kind: str) -> LatticeConfig:
    return ATTN if kind.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else MLP


def save_tokenizer(folder: Path) -> None:
    """A 64-word whitespace tokenizer (w0 ... w63) so `liftq eval` can read text files."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1")
    fast.save_pretrained(folder)


def write_text(path: Path, words: int = 600) -> Path:
    """A text file of `words` tokens for the tiny tokenizer (seeded)."""
    ids = torch.randint(2, 64, (words,), generator=torch.Generator().manual_seed(7))
    path.write_text(" ".join(f"w{i}" for i in ids.tolist()))
    return path


def make_fp_model(folder: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    save_tokenizer(folder)


def tied_quant_dir(root: Path) -> Path:
    """The quantized folder of `quant_dir(root)` turned into a tied-embedding model (built once):
    `tie_word_embeddings: true` and no `lm_head.weight`, as transformers saves a tied model.
    Its codes were fitted with the untied head, which nothing here depends on."""
    import json

    from safetensors.torch import load_file, save_file

    from liftq_cli.io.quantized import UNQUANTIZED_FILE

    tied = root / "quant-tied"
    if tied.is_dir():
        return tied
    shutil.copytree(quant_dir(root), tied)
    config = json.loads((tied / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(tied / UNQUANTIZED_FILE)
    del tensors["lm_head.weight"]
    save_file(tensors, str(tied / UNQUANTIZED_FILE), {"format": "pt"})
    return tied


def quant_dir(root: Path) -> Path:
    """Build (once per root) and return the quantized folder under `root`."""
    if root in _BUILT:
        return _BUILT[root]
    fp, work, out = root / "fp", root / "work", root / "quant"
    make_fp_model(fp)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    options = QuantizeSettings(whiten_steps=0, correction=CorrectionConfig(steps=0))
    with one_thread():
        quantize_blocks(
            fp,
            config_for,
            ids,
            WorkDir(work),
            MATRICES.__getitem__,
            brute_force_encode,
            options,
            {"t": 1},
        )
        write_quantized(fp, WorkDir(work), out, LAYERS, MATRICES.__getitem__, {"job": "tiny"}, "")
    shutil.rmtree(work)
    _BUILT[root] = out
    return out
