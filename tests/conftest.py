"""Test-session setup shared by the whole suite: offline, a private HF_HOME, small thread pools."""

import os
import tempfile

# Set before transformers / datasets / huggingface_hub are imported by any test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hh-peft-hf-home-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_devices() -> list[str]:
    """The devices the device-parametrised tests run on: the CPU always, CUDA when present.
    ``HH_REQUIRE_CUDA=1`` (set by ``benchmarks/gpu_check.sh``) makes a missing GPU an error rather than a CPU-only run."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    elif os.environ.get("HH_REQUIRE_CUDA") == "1":
        raise RuntimeError("HH_REQUIRE_CUDA=1 but torch.cuda.is_available() is False")
    return devices


test_devices.__test__ = False  # a helper, not a test


def pytest_generate_tests(metafunc):
    """A test that takes a ``device`` argument runs once per entry of :func:`test_devices`."""
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", test_devices())


class FakeHub:
    """The Hub's side of an upload, in memory: ``repos[repo_id] = {path_in_repo: bytes}``.

    The fixture :func:`fake_hub` replaces ``HfApi``'s network calls (``create_repo``, ``create_branch``,
    ``create_commit``) and the card download of ``ModelCard.load(repo_id)`` with this recorder, so everything
    above them (transformers' and PEFT's push code, our cards) runs for real, offline.
    """

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []

    def create_repo(self, api, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        self.repos.setdefault(repo_id, {})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, api, repo_id, operations, commit_message=None, **kwargs):
        files = self.repos.setdefault(repo_id, {})
        for op in operations:
            src = op.path_or_fileobj
            if isinstance(src, (str, os.PathLike)):
                with open(src, "rb") as f:
                    files[op.path_in_repo] = f.read()
            else:
                files[op.path_in_repo] = src if isinstance(src, bytes) else src.read()
        self.commits.append({"repo_id": repo_id, "message": commit_message, "paths": [op.path_in_repo for op in operations]})
        return "fake-commit"

    def download_card(self, repo_id, filename, **kwargs):
        """``hf_hub_download`` as ``ModelCard.load(repo_id)`` calls it: the uploaded README.md, or "not found"."""
        from huggingface_hub.errors import EntryNotFoundError

        content = self.repos.get(repo_id, {}).get(filename)
        if content is None:
            raise EntryNotFoundError(f"{filename} is not in the fake repo {repo_id}")
        path = os.path.join(tempfile.mkdtemp(prefix="fake-hub-card-"), filename)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def card(self, repo_id):
        from huggingface_hub import ModelCard

        return ModelCard(self.repos[repo_id]["README.md"].decode())

    def serve(self, repo_id: str) -> None:
        """Lay the uploaded files of ``repo_id`` out in the local Hub cache exactly as a download of ``main``
        would, so ``from_pretrained(repo_id)`` finds them offline (in this process and in subprocesses)."""
        import hashlib

        from huggingface_hub import constants

        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        repo_dir = os.path.join(constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))
        os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
        with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
            f.write(commit)
        for name, content in self.repos[repo_id].items():
            path = os.path.join(repo_dir, "snapshots", commit, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content)


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import HfApi

    fake = FakeHub()
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: fake.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "create_branch", lambda api, repo_id, **kw: None)
    monkeypatch.setattr(HfApi, "create_commit", lambda api, repo_id, operations, **kw: fake.create_commit(api, repo_id, operations, **kw))
    monkeypatch.setattr("huggingface_hub.repocard.hf_hub_download", fake.download_card)
    return fake


@pytest.fixture
def build_distribution(tmp_path):
    """``build(kind)`` builds this project's ``"wheel"`` or ``"editable"`` wheel from a copy of the source (so the
    build writes nothing into the checkout) with setuptools' PEP 517 backend, and returns the wheel's path."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]

    def build(kind: str = "wheel") -> Path:
        source = tmp_path / f"source-{kind}"
        source.mkdir()
        for name in ("pyproject.toml", "setup.py", "README.md", "_hh_peft_autoload.py"):
            shutil.copy2(repo / name, source / name)
        for package in ("hh_peft", "unitary_rnn"):
            shutil.copytree(repo / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
        code = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(tmp_path / 'dist')!r}))"
        result = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return tmp_path / "dist" / result.stdout.strip().splitlines()[-1]

    return build
