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
