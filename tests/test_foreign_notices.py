"""No foreign warning lines: transformers' "PyTorch was not found ..." (every command, in a virtual environment
without torch, as `pip install -e .` makes) and its torchvision fallback notice (export) are dropped by the filter
`llava_jax/__init__.py` installs before transformers is imported.

The test environment has torch, so the subprocesses hide torch and torchvision as a fresh environment lacks them
(a `sitecustomize` setting `sys.modules[name] = None`: `importlib.util.find_spec` then says "not installed", which
is what transformers asks). A control run without llava_jax shows that this reproduces both notices.
"""

from __future__ import annotations

import os
import subprocess
import sys

from llava_jax import FOREIGN_NOTICES
from llava_jax.convert.__main__ import main as convert
from tests.conftest import REPO_ROOT
from tests.convert import helpers


# The image processors our families export (each falls back to its PIL twin without torchvision).
PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor", "LlavaNextImageProcessor", "LlavaOnevisionImageProcessor")


def without_torch_env(tmp_path) -> dict:
    site = tmp_path / "site"
    site.mkdir()
    hide = "import sys\nsys.modules['torch'] = None\nsys.modules['torchvision'] = None\n"
    (site / "sitecustomize.py").write_text(hide)
    return {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO_ROOT}", "JAX_PLATFORMS": "cpu"}


def test_export_without_torch_prints_no_foreign_notice(tmp_path):
    env = without_torch_env(tmp_path)
    control = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert control.returncode != 0 and "ModuleNotFoundError" in control.stderr  # torch is hidden
    processors = "; ".join(f"transformers.{name}" for name in PROCESSORS)
    control = subprocess.run([sys.executable, "-c", f"import transformers; {processors}"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert control.returncode == 0 and all(notice.search(control.stderr) for notice in FOREIGN_NOTICES), \
        control.stderr
    assert all(f"`{name}` requires torchvision" in control.stderr for name in PROCESSORS), control.stderr
    ours = subprocess.run([sys.executable, "-c", f"import llava_jax, transformers; {processors}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert ours.returncode == 0 and "[transformers]" not in ours.stderr, ours.stderr

    helpers.save_tiny_llava(tmp_path / "hf")
    tokenizer = helpers.save_tiny_tokenizer(tmp_path / "tok", size=helpers.VOCAB - 1)
    assert convert(["import-llava", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    command = [sys.executable, "-m", "llava_jax.convert", "export", str(tmp_path / "ours"), str(tmp_path / "out"),
               "--tokenizer", str(tokenizer)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "processor_config.json").is_file()  # the image processor was built and saved
    assert "[transformers]" not in done.stderr and not any(n.search(done.stderr) for n in FOREIGN_NOTICES), \
        done.stderr
