"""Make ``import torchvision`` work in a CPU serving environment, for vLLM's LLaVA and Qwen2-VL models.

    .venv-serve/bin/python scripts/vllm_cpu_torchvision.py             # this interpreter's environment
    python3 scripts/vllm_cpu_torchvision.py .venv-serve/bin/python      # or name it (or its site-packages folder)

Why: vLLM's ``llava.py`` and ``qwen2_vl.py`` import torchvision. On PyPI the Linux torchvision wheels are
CUDA builds; their C extension (``torchvision/_C.so``) needs CUDA torch libraries, so next to a CPU torch it
does not load, and ``import torchvision`` then fails in ``_meta_registrations`` (``register_fake`` of an
operator the extension would have defined). Everything vLLM and transformers use from torchvision for
images (``transforms.v2``, tensors) is pure Python.

What it does (idempotent):

1. If torchvision already imports in the target interpreter without our stub: nothing (a stub left by an
   earlier run is removed). A working torchvision is never stubbed.
2. Otherwise it installs a stub first (``_l2s_torchvision_stub.py`` + ``l2s-torchvision-stub.pth`` in the
   venv's site-packages: a finder that, only when torchvision's C extension failed to load, supplies
   empty ``torchvision._meta_registrations`` and ``torchvision._autograd_registrations`` modules: they only
   register fake/autograd kernels of the extension's own operators, which do not exist then). It is a
   ``.pth`` file because vLLM inspects model architectures in a subprocess that loads no plugin.
3. Then, if needed, the torchvision wheel that matches the installed torch (``pip install torchvision
   torch==<installed>``, so torch is never replaced; ``$PIP_CONSTRAINT`` applies, e.g. a lock file), then
   checks that torchvision, transformers' processors and vLLM's LLaVA / Qwen2-VL modules import. On
   failure it undoes what it installed and exits 1.

Torchvision's C++ operators (nms, roi_align, decoders in ``torchvision.io``) stay unavailable; neither the
models served here nor their image processors use them. ``L2S_TORCHVISION_STUB=0`` turns the stub off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

STUB_MODULE = "_l2s_torchvision_stub"
PTH = "l2s-torchvision-stub.pth"
STUB_SOURCE = '''"""Installed by learn2steer's scripts/vllm_cpu_torchvision.py (see there).

When torchvision's C extension cannot load (a CUDA torchvision wheel next to a CPU torch), supply empty
versions of the two modules that only register kernels for the extension's operators, so that the
pure-Python parts of torchvision import.
Inert when the extension loads, when torchvision is absent, or with L2S_TORCHVISION_STUB=0."""
import importlib.abc
import importlib.machinery
import os
import sys

_NAMES = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


class _Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _NAMES or os.environ.get("L2S_TORCHVISION_STUB") == "0":
            return None
        ext = sys.modules.get("torchvision.extension")
        if ext is None or ext._has_ops():
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__doc__ = "empty: torchvision's C extension is not loaded (learn2steer's torchvision stub)"


if not any(type(f).__name__ == "_Stub" for f in sys.meta_path):
    sys.meta_path.insert(0, _Stub())
'''

CHECK_TORCHVISION = "import torchvision, torchvision.transforms.v2.functional"
CHECK_ALL = ("import torchvision, torchvision.transforms.v2.functional, transformers, vllm; "
             "from transformers import AutoProcessor, AutoImageProcessor, CLIPImageProcessor, Qwen2VLImageProcessor; "
             "import vllm.model_executor.models.llava, vllm.model_executor.models.qwen2_vl; "
             "print(torchvision.__version__)")


def _python_and_site(target: str) -> tuple[Path, Path]:
    p = Path(target)
    if p.is_dir():  # a site-packages folder: <venv>/lib/pythonX.Y/site-packages
        python = p.parents[2] / "bin" / "python"
        if not python.exists():
            sys.exit(f"no interpreter at {python} for site-packages {p}; pass the venv's python instead")
        return python, p
    out = subprocess.run([str(p), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return p, Path(out.stdout.strip())


def _runs(python: Path, code: str, *, stub: bool) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "L2S_TORCHVISION_STUB": "1" if stub else "0"}
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, timeout=900)


def _install_stub(site: Path) -> None:
    (site / f"{STUB_MODULE}.py").write_text(STUB_SOURCE)
    (site / PTH).write_text(f"import {STUB_MODULE}\n")


def _remove_stub(site: Path) -> None:
    for name in (PTH, f"{STUB_MODULE}.py"):
        (site / name).unlink(missing_ok=True)


def _has(python: Path, dist: str) -> str | None:
    out = _runs(python, f"import importlib.metadata as m; print(m.version({dist!r}))", stub=False)
    return out.stdout.strip() if out.returncode == 0 else None


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    python, site = _python_and_site(argv[0] if argv else sys.executable)
    if _has(python, "torchvision") and _runs(python, CHECK_TORCHVISION, stub=False).returncode == 0:
        _remove_stub(site)
        print("torchvision imports on its own here; nothing to do")
        return 0
    had_stub = (site / PTH).exists()
    _install_stub(site)  # first: inert until torchvision is there, so no moment where torchvision is half usable
    installed_now = False
    if not _has(python, "torchvision"):
        torch_version = _has(python, "torch")
        if torch_version is None:
            if not had_stub:
                _remove_stub(site)
            print("torch is not installed in this environment; install it first", file=sys.stderr)
            return 1
        pip = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "torchvision",
                              f"torch=={torch_version}"])
        if pip.returncode != 0:
            if not had_stub:
                _remove_stub(site)
            print("pip could not install a torchvision matching torch " + torch_version, file=sys.stderr)
            return 1
        installed_now = True
    check = _runs(python, CHECK_ALL, stub=True)
    if check.returncode != 0:
        if installed_now:
            subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision"])
        _remove_stub(site)
        print("torchvision with the stub still does not import; undone:\n" + check.stderr[-3000:], file=sys.stderr)
        return 1
    version = check.stdout.strip().splitlines()[-1]
    print(f"torchvision {version}: pure-Python parts with learn2steer's stub of its C-extension registrations "
          f"({site / PTH})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
