"""What users install: the wheel built from this tree holds every package and works from outside the checkout.

Every other test imports the editable checkout, where a package missing from pyproject's list still imports.
Here the wheel is built from a copy of the tree, installed (not editable) into a fresh environment whose only
other packages are the dependencies, and run from a directory that has no lmcached/ folder to fall back on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import tomllib

import lmcached

from .conftest import ServeProcess, start_process, stop_serve

ROOT = Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The distribution's files: pyproject maps tui/ and codecs/ into the lmcached package.
SHIPPED_TREES = ["lmcached", "tui", "codecs"]


def shipped_folders() -> dict[str, Path]:
    """Every folder of the shipped trees that holds a module or data file, by the package name it installs as."""
    package_dir = PYPROJECT["tool"]["setuptools"]["package-dir"]
    folder_to_package = {Path(folder): package for package, folder in package_dir.items()}
    found = {}
    for tree in SHIPPED_TREES:
        for folder in [ROOT / tree, *(p for p in (ROOT / tree).rglob("*") if p.is_dir())]:
            if folder.name == "__pycache__" or not any(f.is_file() for f in folder.iterdir()):
                continue
            relative = folder.relative_to(ROOT)
            top = next(f for f in folder_to_package if relative.parts[: len(f.parts)] == f.parts)
            package = ".".join([folder_to_package[top], *relative.parts[len(top.parts) :]])
            found[package] = relative
    return found


def test_every_folder_of_the_tree_is_a_listed_package() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    folders = shipped_folders()
    missing = {package: str(folder) for package, folder in folders.items() if package not in listed}
    assert not missing, f"folders the wheel would leave out (add them to [tool.setuptools] packages): {missing}"
    assert not listed - set(folders), f"packages listed in pyproject.toml with no folder: {listed - set(folders)}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment with the wheel installed in it; returns its bin/ folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # build from a copy, so the checkout gets no build/ or egg-info folders
    source.mkdir()
    for name in ["pyproject.toml", "README.md", *SHIPPED_TREES]:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    # This environment's setuptools builds it when it is new enough (vLLM brings one); else pip fetches one.
    offline = ["--no-build-isolation"] if _version("setuptools") >= (68,) else []
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *offline, "-w", str(tmp / "dist"), str(source)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("lmcached-*.whl")

    env = tmp / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    env_python = env / "bin" / "python"
    # The dependencies come from this environment's site-packages, listed after the fresh one's, so the
    # checkout's editable hook (a .pth file there, which a plain path entry does not run) is left behind.
    site = Path(subprocess.run([env_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                               capture_output=True, text=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env_python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return env / "bin"


def _version(dist: str) -> tuple[int, ...]:
    from importlib import metadata

    try:
        return tuple(int(part) for part in metadata.version(dist).split(".")[:2] if part.isdigit())
    except metadata.PackageNotFoundError:
        return ()


def run_installed(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_the_installed_wheel_imports_every_entry_point(installed: Path, tmp_path: Path) -> None:
    done = run_installed(installed, "lmcached", "--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"lmcached {lmcached.__version__}", done.stdout + done.stderr

    done = run_installed(installed, "lmcached", "bench", "--help", cwd=tmp_path)
    assert done.returncode == 0 and "Usage" in done.stdout, done.stderr

    # What vLLM's kv_connector_module_path and the GPU check import, and the codecs' golden blobs.
    probe = textwrap.dedent(
        """
        import importlib, json, lmcached
        from importlib import resources
        for name in ["lmcached.integrations.vllm", "lmcached.bench.gpu_check", "lmcached.tui.app", "lmcached.codecs.cachegen"]:
            importlib.import_module(name)
        golden = [p.name for p in resources.files("lmcached.codecs.golden").iterdir() if p.name.endswith(".bin")]
        print(json.dumps({"file": lmcached.__file__, "golden": len(golden)}))
        """
    )
    done = run_installed(installed, "python", "-c", probe, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["file"].startswith(str(installed.parent)), f"imported the checkout, not the wheel: {found['file']}"
    assert found["golden"] == len(list((ROOT / "codecs" / "golden").glob("*.bin")))


@pytest.mark.slow
def test_the_installed_daemon_serves_a_round_trip(installed: Path, tmp_path: Path) -> None:
    cmd = [str(installed / "lmcached"), "serve", "--port", "0", "--monitor-port", "0", "--worker-port", "0"]
    server: ServeProcess = start_process(cmd, "lmcached ready ", env={"HOME": str(tmp_path)})
    try:
        client = textwrap.dedent(
            f"""
            import json, urllib.request, torch
            from lmcached.client import KVClient
            instances = json.load(urllib.request.urlopen("{server.http}/instances"))
            tokens = list(range(300))
            kv = torch.randn(2, 4, 300, 64).to(torch.float16)
            with KVClient("{server.data}") as client:
                stored = client.store(tokens, kv)
                back = client.retrieve(tokens)
            print(json.dumps({{"instances": instances, "stored": stored, "equal": back is not None and torch.equal(back, kv)}}))
            """
        )
        done = run_installed(installed, "python", "-c", client, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.splitlines()[-1])
        assert result["stored"] == 300 and result["equal"], result
        assert result["instances"], result  # the controller answers and knows its embedded worker
    finally:
        stop_serve(server)
