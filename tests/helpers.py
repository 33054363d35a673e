"""Assertions shared by the CLI tests."""


def assert_one_line_error(result, *fragments: str, code: int = 2) -> None:
    """A user mistake: the given exit code, one line on stderr naming the value, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def calibration_text(tmp_path):
    """A short repetitive calibration text file (enough tokens for a few 32-token windows)."""
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    return text


def tiny_llama_folder(
    folder, tokenizer_from, vocab: int = 49152, layers: int = 2, hidden: int = 64
):
    """A random tied-embedding Llama saved to `folder` with the tokenizer files of
    `tokenizer_from` (so real text calibrates it)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


def run_liftq(*args: str) -> None:
    """Run the CLI as a user does, in a subprocess of this interpreter (raises on failure)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "liftq_cli", *args], check=True)
