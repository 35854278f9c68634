"""Run by `cargo xtask test` in a fresh venv that has only the built wheel:
the package imports from that venv and works end to end."""

import os
import sys

import commy

where = os.path.realpath(commy.__file__)
assert where.startswith(os.path.realpath(sys.prefix)), f"commy imported from {where}, not the venv"
with commy.Mesh() as mesh:
    name = f"smoke-{os.getpid()}"
    mesh.serve(name, lambda d: d[::-1])
    assert mesh.call(name, b"wheel", timeout=10) == b"leehw"
    try:
        mesh.call(f"{name}-missing", b"")
        raise AssertionError("expected NotFound")
    except commy.NotFound:
        pass
print(f"commy {commy.__version__} from {where}: ok")
