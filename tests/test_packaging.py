"""The wheel maps cli/ and store/ to trakwomp.cli and trakwomp.store and installs no generic top-level names."""

import subprocess
import sys
import zipfile

import pytest
from conftest import REPO


@pytest.mark.slow
def test_wheel_installs_only_the_trakwomp_package(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("trakwomp-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"trakwomp"}
    assert "trakwomp/cli/main.py" in names and "trakwomp/store/zarr_store.py" in names
    assert {"trakwomp/assets/cifar10_mini.npz", "trakwomp/assets/fortunes_mini.jsonl.gz",
            "trakwomp/assets/fortunes_mini.md", "trakwomp/store/paths.py"} <= set(names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import trakwomp, trakwomp.cli.main, trakwomp.store; "
             "print(trakwomp.__file__); print(trakwomp.store.__file__); "
             "from trakwomp.data.specs import load_dataset; print(len(load_dataset('cifar10-mini:test'))); "
             "print(len(load_dataset('fortunes-mini:test')))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": ""})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.split()
    assert lines[0].startswith(str(site)) and lines[1].startswith(str(site)) and lines[2:] == ["500", "200"]


def test_every_public_name_and_its_public_methods_say_what_they_do():
    """Docstrings of the public API (trakwomp.__all__): each name, and each public method a
    class defines without inheriting its docstring."""
    import inspect

    import trakwomp
    missing = []
    for name in trakwomp.__all__:
        obj = getattr(trakwomp, name)
        own = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
        if not own or own.startswith(f"{name}("):  # a dataclass's generated signature is no docstring
            missing.append(name)
        for method, member in vars(obj).items() if inspect.isclass(obj) else ():
            if not method.startswith("_") and inspect.isfunction(member) and not inspect.getdoc(getattr(obj, method)):
                missing.append(f"{name}.{method}")
    assert not missing, missing
