"""The README's "Loading Hugging Face weights" section runs as written: its python
blocks, in order, in one namespace."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
HEADING = "## Loading Hugging Face weights"


def _section_code() -> list[str]:
  text = README.read_text()
  start = text.index(HEADING)
  end = text.find("\n## ", start + len(HEADING))
  section = text[start:end if end >= 0 else None]
  return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_hf_section_runs():
  pytest.importorskip("safetensors")
  blocks = _section_code()
  assert len(blocks) >= 2
  namespace = {"__name__": "readme_hf"}
  for code in blocks:
    exec(compile(code, f"{README.name}:{HEADING}", "exec"), namespace)
  assert namespace["y"].shape == (16, 64)
