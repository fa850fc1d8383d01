"""The built wheel, installed in a fresh venv, runs a training and lists its checkpoints.

The editable install of the development venv maps ``tlaunch`` onto the source folders, so it
cannot notice a subpackage that ``pyproject.toml`` forgets to ship. This test builds the wheel
from a copy of the working tree (a ``build/`` directory reused by setuptools would put a
forgotten package into the wheel anyway, and building in place would leave one here), installs
it into a new venv that borrows the development venv's third-party packages through a ``.pth``
line (no network: torch is not installed again), and runs the installed ``tlaunch`` from a
directory outside the repository.

A ``.pth`` line naming a directory puts it on ``sys.path`` without running the ``.pth`` files
inside it, so the editable install's finder (``__editable__*tlaunch*.pth``) never loads: the
only ``tlaunch`` the new venv can import is the wheel's. The test checks that too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from helpers import clean_env, results

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
REPO = Path(__file__).parents[2]
# What a build must not see: caches, venvs, earlier builds, run output.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "*cache", "tlaunch-runs"
)

TRAIN = """\
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import tlaunch

run = tlaunch.init()
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))
model = torch.nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model, opt, loader = run.prepare(model, opt, DataLoader(data, batch_size=8, shuffle=True))
for _ in run.epochs(2):
    for x, y in run.batches(loader):
        run.backward(F.mse_loss(model(x), y))
        opt.step()
        opt.zero_grad()
run.finish()
# One write per line: both ranks share the launcher's stdout, and print() writes the text and
# its newline separately, so two ranks' lines could run together.
sys.stdout.write(
    f"RESULT rank={run.rank} world={run.world_size} step={run.step} tlaunch={tlaunch.__file__}\\n"
)
"""
# 64 samples / 2 ranks / batch 8 = 4 steps an epoch, 8 in all; --save-every 3 commits 3, 6, 8.
COMMITTED = (3, 6, 8)


def sh(*cmd, cwd, timeout: float = 120) -> subprocess.CompletedProcess:
    env = clean_env()
    env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, f"{cmd} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    dist = root / "dist"
    sh(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "-q", "-w", dist, ".",
        cwd=source,
    )  # fmt: skip
    (built,) = dist.glob("tlaunch-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A venv with only the wheel's tlaunch, and the development venv's other packages."""
    venv = tmp_path_factory.mktemp("venv")
    sh(sys.executable, "-m", "venv", "--without-pip", venv, cwd=venv)
    python = venv / "bin" / "python"
    site = sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=venv)
    borrowed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (Path(site.stdout.strip()) / "_borrowed_site.pth").write_text("\n".join(sorted(borrowed)))
    # pip comes from the borrowed site-packages; --ignore-installed keeps it from looking at
    # the editable tlaunch there (and from ever uninstalling it).
    sh(
        python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
        "--no-warn-script-location", "-q", wheel,
        cwd=venv,
    )  # fmt: skip
    return venv


def source_packages() -> set[str]:
    """Every package of the source tree, by import name, from pyproject's package-dir."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add(".".join((name, *rel.parts)))
    return found


def test_the_wheel_ships_every_package_of_the_source_tree(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {
        n[: -len("/__init__.py")].replace("/", ".") for n in names if n.endswith("/__init__.py")
    }
    expected = source_packages()
    assert {"tlaunch", "tlaunch.strategies", "tlaunch.storage"} <= expected
    missing = sorted(expected - shipped)
    assert not missing, f"packages missing from the wheel (pyproject's packages list?): {missing}"


def test_the_installed_wheel_trains_on_two_processes_and_lists_its_checkpoints(venv, tmp_path):
    bin_dir = venv / "bin"
    where = sh(bin_dir / "python", "-c", "import tlaunch; print(tlaunch.__file__)", cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), f"tlaunch imported from {where.stdout}"
    assert str(REPO) not in where.stdout

    (tmp_path / "train.py").write_text(TRAIN)
    ckpt = tmp_path / "ckpt"
    run = sh(
        bin_dir / "tlaunch", "--cpus", "2", "train.py", "--checkpoint-dir", ckpt,
        "--save-every", "3", "--progress", "off",
        cwd=tmp_path, timeout=240,
    )  # fmt: skip
    rows = results(run.stdout)
    assert sorted((r["rank"], r["world"], r["step"]) for r in rows) == [
        ("0", "2", "8"),
        ("1", "2", "8"),
    ]
    assert all(r["tlaunch"].startswith(str(venv)) for r in rows), rows

    listing = sh(bin_dir / "tlaunch", "ckpt", "ls", ckpt, cwd=tmp_path)
    rows = [line.split() for line in listing.stdout.splitlines()]
    # Columns: STEP, date, time, size, unit, STATUS, metrics.
    status = {int(r[0]): r[5] for r in rows if r and r[0].isdigit()}
    assert status == dict.fromkeys(COMMITTED, "ok"), listing.stdout
