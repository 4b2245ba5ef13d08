"""tests/hub_server.py against the real clients: huggingface_hub, transformers and datasets.

Uploads go through `HfApi(endpoint=...)` in this process. Downloads through transformers and datasets
run in a fresh interpreter, because huggingface_hub reads HF_ENDPOINT when it is imported.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import save_file

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def run_client(hub, tmp_path, code: str, *args: str) -> str:
    """Run `code` (argv: `args`) in a fresh interpreter whose Hub is `hub`, in tmp_path; return its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_TOKEN="dummy", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HOME=str(tmp_path / "hf_home"), HF_HUB_CACHE=str(tmp_path / "hf_home" / "hub"))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_upload_folder_then_download(local_hub, tmp_path):
    folder = tmp_path / "upload"
    folder.mkdir()
    save_file({"weight": torch.arange(6.0).reshape(2, 3)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 16}))
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# A tiny repo\n")
    api = HfApi(endpoint=local_hub.url, token="dummy")
    api.create_repo("tester/tiny")
    commit = api.upload_folder(repo_id="tester/tiny", folder_path=folder)
    assert api.model_info("tester/tiny").sha == commit.oid
    assert sorted(api.list_repo_files("tester/tiny")) == ["README.md", "config.json", "model.safetensors"]

    out = run_client(local_hub, tmp_path, """
        import json, sys
        from huggingface_hub import hf_hub_download
        from transformers import AutoConfig
        repo, sha = sys.argv[1:]
        files = ("model.safetensors", "config.json", "README.md")
        paths = {rev: {f: hf_hub_download(repo, f, revision=rev) for f in files} for rev in ("main", sha)}
        try:
            AutoConfig.from_pretrained("tester/missing")
            missing = None
        except OSError as e:
            missing = str(e)
        print(json.dumps({"paths": paths, "hidden_size": AutoConfig.from_pretrained(repo).hidden_size,
                          "missing": missing}))
    """, "tester/tiny", commit.oid)
    result = json.loads(out.splitlines()[-1])
    for paths in result["paths"].values():
        assert {f: Path(p).read_bytes() for f, p in paths.items()} == {
            f.name: f.read_bytes() for f in folder.iterdir()}
    assert result["hidden_size"] == 16
    assert "tester/missing" in result["missing"]


def test_errors_map_to_hub_exceptions(local_hub, tmp_path):
    api = HfApi(endpoint=local_hub.url, token="dummy")
    api.create_repo("tester/tiny")
    api.create_repo("tester/tiny", exist_ok=True)
    with pytest.raises(HfHubHTTPError, match="409"):
        api.create_repo("tester/tiny")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="tester/tiny")

    def download(repo_id, filename="config.json", revision=None):
        return hf_hub_download(repo_id, filename, revision=revision, endpoint=local_hub.url,
                               cache_dir=tmp_path / "cache")

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/missing")
    with pytest.raises(RepositoryNotFoundError):
        download("tester/missing")
    with pytest.raises(EntryNotFoundError):
        download("tester/tiny", "missing.json")
    with pytest.raises(RevisionNotFoundError):
        download("tester/tiny", revision="dev")


def test_push_to_hub_then_from_pretrained(local_hub, tmp_path):
    run_client(local_hub, tmp_path, """
        import torch
        from transformers import ViTConfig, ViTForImageClassification
        torch.manual_seed(0)
        config = ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, num_labels=3)
        model = ViTForImageClassification(config).eval()
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            torch.save({"x": x, "logits": model(pixel_values=x).logits}, "original.pt")
        model.push_to_hub("tester/tiny-vit")
    """)
    assert {"config.json", "model.safetensors", "README.md"} <= set(
        HfApi(endpoint=local_hub.url).list_repo_files("tester/tiny-vit"))

    run_client(local_hub, tmp_path, """
        import torch
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained("tester/tiny-vit").eval()
        with torch.no_grad():
            torch.save(model(pixel_values=torch.load("original.pt")["x"]).logits, "reloaded.pt")
    """)
    assert torch.equal(torch.load(tmp_path / "reloaded.pt"), torch.load(tmp_path / "original.pt")["logits"])


def test_dataset_streaming_from_parquet(local_hub, tmp_path):
    rows = [{"label": 0, "text": "a"}, {"label": 1, "text": "b"}, {"label": 2, "text": "c"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    api = HfApi(endpoint=local_hub.url, token="dummy")
    api.create_repo("tester/tiny-data", repo_type="dataset")
    api.upload_file(path_or_fileobj=tmp_path / "train.parquet", path_in_repo="data/train-00000-of-00001.parquet",
                    repo_id="tester/tiny-data", repo_type="dataset")

    out = run_client(local_hub, tmp_path, """
        import json
        import datasets
        print(json.dumps(list(datasets.load_dataset("tester/tiny-data", split="train", streaming=True))))
    """)
    assert json.loads(out.splitlines()[-1]) == rows
