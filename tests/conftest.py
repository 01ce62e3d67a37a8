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
