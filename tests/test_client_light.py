"""The client installs on a bare CPU box: importing and running it must not load torch, diffusers or ORT."""

import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "onnxruntime", "onnx")

PROBE = f"""
import sys, importlib.abc
HEAVY = {HEAVY!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in HEAVY:
            raise ImportError('client imported ' + name)
sys.meta_path.insert(0, Block())
import pkgutil, importlib
import realfake.client as pkg
for m in pkgutil.iter_modules(pkg.__path__):
    importlib.import_module('realfake.client.' + m.name)
from realfake.client.cli import app
from typer.testing import CliRunner
r = CliRunner().invoke(app, ['--help'])
assert r.exit_code == 0, r.output
r = CliRunner().invoke(app, ['classes', 'cifar10'])
assert r.exit_code == 0 and 'airplane' in r.output, r.output
r = CliRunner().invoke(app, ['generate', '--help'])
assert r.exit_code == 0, r.output
print('LOADED', sorted(n for n in sys.modules if n.split('.')[0] in HEAVY))
"""


def test_client_never_imports_model_libraries():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED []" in result.stdout
