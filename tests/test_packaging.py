"""The wheel a user installs: built from the checkout's files, installed into a fresh virtual environment that
borrows only the already-installed third-party packages (torch & co., no network), then used from outside the
source tree: bundled recipes (and a user's own recipe directory) compose for ``--dry-run``, the console
scripts resolve, and every third-party module the package imports is a declared dependency."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OWN = {"mllm", "parallel", "launch"}
SCRIPTS = ("mllm-data", "mllm-convert", "mllm-chat", "mllm-train")


def _run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLLM_RECIPES")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    src = root / "src"
    for name in files:  # the checkout's files only (no build/, .venv, caches)
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)], root)
    wheel = next((root / "dist").glob("mllm-*.whl"))
    env_dir = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], root)
    python = env_dir / "bin" / "python"
    site = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root
        ).stdout.strip()
    )
    # The installed third-party packages (torch, transformers, ...) of this interpreter, after the venv's own.
    (site / "borrowed_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [
            str(python),
            "-m",
            "pip",
            "--disable-pip-version-check",
            "-q",
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        root,
    )
    outside = root / "elsewhere"
    outside.mkdir()
    return env_dir, outside, site


def test_bundled_and_user_recipes_dry_run_from_outside_the_source_tree(venv):
    env_dir, outside, site = venv
    where = _run([str(env_dir / "bin" / "python"), "-c", "import mllm; print(mllm.__file__)"], outside).stdout
    assert Path(where.strip()).is_relative_to(site)  # the installed wheel, not the checkout
    out = _run(
        [str(env_dir / "bin" / "mllm-train"), "--config-name=internvl1_5_26b_sft", "--dry-run"], outside
    ).stdout
    assert "pp" in out and "GiB" in out
    user = outside / "my_recipes"
    user.mkdir()
    (user / "mine.yaml").write_text("defaults:\n  - tiny_sft\n  - _self_\ntrain:\n  steps: 7\n")
    out = _run(
        [
            str(env_dir / "bin" / "mllm-train"),
            "--config-dir",
            str(user),
            "--config-name=mine",
            "--cfg",
            "job",
        ],
        outside,
    ).stdout
    assert "steps: 7" in out and "hidden_size: 64" in out  # the user's key on top of the bundled tiny model


def test_console_scripts_resolve(venv):
    env_dir, outside, _ = venv
    code = (
        "from importlib.metadata import entry_points\n"
        "eps = {e.name: e for e in entry_points(group='console_scripts') if e.dist.name == 'mllm'}\n"
        "print(sorted(eps)); [e.load() for e in eps.values()]\n"
    )
    out = _run([str(env_dir / "bin" / "python"), "-c", code], outside).stdout
    for script in SCRIPTS:
        assert script in out
        assert (env_dir / "bin" / script).is_file()


def _third_party_imports(package_dir: Path) -> set[str]:
    names: set[str] = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in OWN and n != "__future__"}


def test_runtime_dependencies_are_declared(venv):
    env_dir, outside, site = venv
    meta = json.loads(
        _run(
            [
                str(env_dir / "bin" / "python"),
                "-c",
                "import json; from importlib.metadata import requires; print(json.dumps(requires('mllm')))",
            ],
            outside,
        ).stdout
    )
    runtime = {
        r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()
        for r in meta
        if "extra ==" not in r
    }
    extras = {
        r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()
        for r in meta
        if "extra ==" in r
    }
    dists = packages_distributions()
    optional = {"transformer_engine", "flash_attn"}  # GPU extras that need not be installed here
    for module in sorted(_third_party_imports(site / "mllm") | _third_party_imports(site / "parallel")):
        if module in optional:
            continue
        owners = {d.lower() for d in dists.get(module, [])}
        assert owners, f"{module}: imported by the package but not installed here"
        assert owners & (runtime | extras), f"{module} (from {owners}) is not a declared dependency"
    assert {"transformers", "torch", "hydra-core"} <= runtime
