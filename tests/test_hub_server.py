"""End-to-end tests of ``hub_server.LocalHub`` with the real huggingface_hub / transformers clients.

Clients run in subprocesses so that ``HF_ENDPOINT`` is set before ``huggingface_hub`` is imported.
"""

import hashlib
import json
import os
import random
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import HUB_TOKEN
from hub_server import LocalHub

REPO = "me/tiny-bert"
BIG_SIZE = 11 * 1024 * 1024  # > 10 MB, sent base64-inline in "regular" mode

_PRELUDE = r"""
import json, os, random, sys
import torch
torch.set_num_threads(1)
from transformers import BertConfig, BertModel, BertTokenizer

REPO = "me/tiny-bert"
INPUT_IDS = torch.tensor([[2, 5, 6, 7, 3]])
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "the"]


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return BertModel(config).eval()


def tiny_tokenizer(folder):
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(VOCAB) + "\n")
    return BertTokenizer(path)


def hidden(model):
    with torch.no_grad():
        return model(INPUT_IDS).last_hidden_state


def error_names(exc):
    names = []
    while exc is not None:
        names += [cls.__name__ for cls in type(exc).__mro__]
        exc = exc.__cause__ or exc.__context__
    return names
"""

PUSH_SCRIPT = (
    _PRELUDE
    + r"""
from huggingface_hub import HfApi

work = sys.argv[1]
model = tiny_bert()
first = model.push_to_hub(REPO)
out_first = hidden(model)

tokenizer = tiny_tokenizer(work)
tok_commit = tokenizer.push_to_hub(REPO)

with torch.no_grad():
    model.embeddings.word_embeddings.weight.mul_(2.0)
second = model.push_to_hub(REPO, commit_message="Update weights")
out_second = hidden(model)

big = random.Random(0).randbytes(int(sys.argv[2]))
big_commit = HfApi().upload_file(path_or_fileobj=big, path_in_repo="blobs/big.bin", repo_id=REPO)

torch.save({"first": out_first, "second": out_second}, os.path.join(work, "expected.pt"))
print(json.dumps({
    "first": first.oid, "tokenizer": tok_commit.oid, "second": second.oid, "big": big_commit.oid,
    "ids": tokenizer("hello world the")["input_ids"],
}))
"""
)

PULL_SCRIPT = (
    _PRELUDE
    + r"""
from huggingface_hub import HfApi, hf_hub_download
from transformers import AutoModel, AutoTokenizer

work, first_sha = sys.argv[1], sys.argv[2]
expected = torch.load(os.path.join(work, "expected.pt"))
latest = AutoModel.from_pretrained(REPO).eval()
pinned = AutoModel.from_pretrained(REPO, revision=first_sha).eval()
tokenizer = AutoTokenizer.from_pretrained(REPO)
with open(hf_hub_download(REPO, "blobs/big.bin"), "rb") as f:
    big_sha256 = __import__("hashlib").sha256(f.read()).hexdigest()
try:
    AutoModel.from_pretrained("me/does-not-exist")
    missing = []
except Exception as exc:
    missing = error_names(exc)
print(json.dumps({
    "latest_equal": torch.equal(hidden(latest), expected["second"]),
    "pinned_equal": torch.equal(hidden(pinned), expected["first"]),
    "ids": tokenizer("hello world the")["input_ids"],
    "big_sha256": big_sha256,
    "files": sorted(HfApi().list_repo_files(REPO)),
    "missing": missing,
}))
"""
)

LFS_SCRIPT = (
    _PRELUDE
    + r"""
from transformers import AutoModel, AutoTokenizer

work = sys.argv[1]
model = tiny_bert()
model.push_to_hub(REPO)
tiny_tokenizer(work).push_to_hub(REPO)
cache = os.path.join(work, "fresh-cache")
loaded = AutoModel.from_pretrained(REPO, cache_dir=cache).eval()
tokenizer = AutoTokenizer.from_pretrained(REPO, cache_dir=cache)
print(json.dumps({
    "equal": torch.equal(hidden(loaded), hidden(model)),
    "ids": tokenizer("hello world the")["input_ids"],
}))
"""
)

ERRORS_SCRIPT = r"""
import json
from huggingface_hub import HfApi, hf_hub_download

api = HfApi()
results = {}


def check(name, fn):
    try:
        fn()
        results[name] = ["no error"]
    except Exception as exc:
        results[name] = [cls.__name__ for cls in type(exc).__mro__]
        results[name + "_status"] = getattr(getattr(exc, "response", None), "status_code", None)


api.create_repo("me/small")
check("create_again", lambda: api.create_repo("me/small"))
api.create_repo("me/small", exist_ok=True)
api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="me/small")
check("download_missing_repo", lambda: hf_hub_download("me/does-not-exist", "config.json"))
check("info_missing_repo", lambda: api.model_info("me/does-not-exist"))
check("missing_file", lambda: hf_hub_download("me/small", "nope.json"))
check("missing_revision", lambda: hf_hub_download("me/small", "config.json", revision="nope"))
pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="pr.txt", repo_id="me/small", create_pr=True)
with open(hf_hub_download("me/small", "pr.txt", revision=pr.pr_revision)) as f:
    results["pr_content"] = f.read()
check("pr_file_on_main", lambda: hf_hub_download("me/small", "pr.txt"))
api.delete_file("config.json", repo_id="me/small")
results["files_after_delete"] = api.list_repo_files("me/small")
print(json.dumps(results))
"""


def _client_env(endpoint: str, home: Path, **extra: str) -> dict[str, str]:
    """Environment for a client subprocess talking only to ``endpoint``."""
    drop = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_")
    proxies = {"http_proxy", "https_proxy", "all_proxy"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k.lower() not in proxies}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_OFFLINE="0",
        HF_TOKEN="dummy",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HOME=str(home),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        **extra,
    )
    return env


def _run(script: str, env: dict[str, str], *args: str) -> dict:
    """Run ``script`` in a fresh interpreter and return the JSON it prints last."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, f"client failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _paths(hub: LocalHub) -> list[str]:
    return [path for _, path, _ in hub.requests]


@pytest.mark.slow
def test_push_to_hub_then_from_pretrained_roundtrip(local_hub, tmp_path):
    pushed = _run(
        PUSH_SCRIPT, _client_env(local_hub.endpoint, tmp_path / "home-push"), str(tmp_path), str(BIG_SIZE)
    )

    # What the server received.
    first = local_hub.files(REPO, revision=pushed["first"])
    assert {"config.json", "model.safetensors", "README.md"} <= set(first)
    assert json.loads(first["config.json"])["hidden_size"] == 32
    assert first["README.md"].startswith(b"---\n") and b"library_name: transformers" in first["README.md"]
    tok = local_hub.files(REPO, revision=pushed["tokenizer"])
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(tok)
    second = local_hub.files(REPO, revision=pushed["second"])
    changed = {p for p in second if second[p] != tok.get(p)}
    assert changed == {"model.safetensors"}  # unchanged config/README/tokenizer were skipped
    big = local_hub.files(REPO)["blobs/big.bin"]
    assert big == random.Random(0).randbytes(BIG_SIZE)
    assert [c["sha"] for c in local_hub.commits(REPO)][:4] == [
        pushed["big"],
        pushed["second"],
        pushed["tokenizer"],
        pushed["first"],
    ]
    assert local_hub.lfs_paths(REPO) == set()  # default mode: everything inline ("regular")
    assert not any("/info/lfs/" in p for p in _paths(local_hub))

    # Fresh cache, download everything back over HTTP.
    pulled = _run(
        PULL_SCRIPT, _client_env(local_hub.endpoint, tmp_path / "home-pull"), str(tmp_path), pushed["first"]
    )
    assert pulled["latest_equal"] and pulled["pinned_equal"]
    assert pulled["ids"] == pushed["ids"]
    assert pulled["big_sha256"] == hashlib.sha256(big).hexdigest()
    assert {"config.json", "model.safetensors", "README.md", "blobs/big.bin"} <= set(pulled["files"])
    assert "RepositoryNotFoundError" in pulled["missing"]
    assert any(f"/resolve/{pushed['first']}/model.safetensors" in p for p in _paths(local_hub))


@pytest.mark.slow
def test_lfs_uploads(tmp_path):
    with LocalHub(lfs_threshold=1024) as hub:
        env = _client_env(hub.endpoint, tmp_path / "home", HF_HUB_DISABLE_XET="1")
        result = _run(LFS_SCRIPT, env, str(tmp_path))
        assert result["equal"] and result["ids"] == [2, 5, 6, 7, 3]
        assert {"model.safetensors", "tokenizer.json"} <= hub.lfs_paths(REPO)
        assert "config.json" not in hub.lfs_paths(REPO)  # small files stay regular
        paths = _paths(hub)
        assert f"/{REPO}.git/info/lfs/objects/batch" in paths
        assert any(p.startswith(f"/__lfs/model/{REPO}/") for p in paths)


def test_client_errors_and_small_operations(local_hub, tmp_path):
    result = _run(ERRORS_SCRIPT, _client_env(local_hub.endpoint, tmp_path / "home"))
    assert "HfHubHTTPError" in result["create_again"] and result["create_again_status"] == 409
    assert "RepositoryNotFoundError" in result["download_missing_repo"]
    assert result["download_missing_repo_status"] == 404
    assert "RepositoryNotFoundError" in result["info_missing_repo"]
    assert "EntryNotFoundError" in result["missing_file"]
    assert "RevisionNotFoundError" in result["missing_revision"]
    assert result["pr_content"] == "pr"
    assert "EntryNotFoundError" in result["pr_file_on_main"]
    assert result["files_after_delete"] == [".gitattributes"]


def _http(url: str, method: str = "GET", data=None, headers=None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_token_is_checked_on_every_request_but_lfs_transfers(guarded_hub):
    """A hub built with a token answers 401 to a request with none or another one, on the API and on
    /resolve alike; LFS object transfers (the Hub's pre-signed storage URLs) need none."""
    url, json_type = guarded_hub.endpoint, {"Content-Type": "application/json"}
    create = json.dumps({"name": "guarded", "organization": "me"}).encode()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, reply, _ = _http(f"{url}/api/repos/create", "POST", create, {**json_type, **headers})
        assert status == 401 and "Invalid credentials" in reply["X-Error-Message"]
        assert _http(f"{url}/api/whoami-v2", headers=headers)[0] == 401
    good = {"Authorization": f"Bearer {HUB_TOKEN}"}
    assert _http(f"{url}/api/repos/create", "POST", create, {**json_type, **good})[0] == 200
    assert _http(f"{url}/me/guarded/resolve/main/.gitattributes")[0] == 401
    assert _http(f"{url}/me/guarded/resolve/main/.gitattributes", headers=good)[0] == 200
    data = b"weights" * 200
    lfs_put = _http(f"{url}/__lfs/model/me/guarded/{hashlib.sha256(data).hexdigest()}", "PUT", data)
    assert lfs_put[0] == 200


def test_raw_http_range_chunked_and_ndjson(local_hub):
    url = local_hub.endpoint
    create = json.dumps({"name": "raw", "organization": "me"}).encode()
    status, _, body = _http(f"{url}/api/repos/create", "POST", create, {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body)["url"] == f"{url}/me/raw"
    assert _http(f"{url}/api/repos/create", "POST", create, {"Content-Type": "application/json"})[0] == 409

    data = bytes(range(256)) * 8
    oid = hashlib.sha256(data).hexdigest()
    status, _, _ = _http(
        f"{url}/__lfs/model/me/raw/{oid}",
        "PUT",
        iter([data[:1000], data[1000:]]),
        {"Transfer-Encoding": "chunked"},
    )
    assert status == 200
    lines = [
        {"key": "header", "value": {"summary": "raw commit", "description": ""}},
        {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": len(data)}},
        {"key": "file", "value": {"path": "a/b.txt", "content": "aGk=", "encoding": "base64"}},
    ]
    ndjson = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    status, _, body = _http(
        f"{url}/api/models/me/raw/commit/main", "POST", ndjson, {"Content-Type": "application/x-ndjson"}
    )
    sha = json.loads(body)["commitOid"]
    assert status == 200 and local_hub.files("me/raw")["a/b.txt"] == b"hi"

    status, headers, _ = _http(f"{url}/me/raw/resolve/main/w.bin", "HEAD")
    assert status == 200 and headers["X-Repo-Commit"] == sha and headers["ETag"] == f'"{oid}"'
    assert headers["Content-Length"] == str(len(data)) and headers["X-Linked-Size"] == str(len(data))
    status, headers, body = _http(f"{url}/me/raw/resolve/{sha}/w.bin", headers={"Range": "bytes=10-19"})
    assert status == 206 and body == data[10:20] and headers["Content-Range"] == f"bytes 10-19/{len(data)}"

    status, _, body = _http(f"{url}/api/models/me/raw/tree/main?recursive=true")
    assert status == 200 and [(e["type"], e["path"]) for e in json.loads(body)] == [
        ("file", ".gitattributes"),
        ("directory", "a"),
        ("file", "a/b.txt"),
        ("file", "w.bin"),
    ]
    status, headers, _ = _http(f"{url}/me/raw/resolve/main/missing.txt", "HEAD")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound" and headers["X-Repo-Commit"] == sha


def test_command_line(tmp_path):
    script = Path(__file__).with_name("hub_server.py")
    proc = subprocess.Popen([sys.executable, str(script), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:")
        status, _, body = _http(f"{endpoint}/api/whoami-v2")
        assert status == 200 and json.loads(body)["name"] == "user"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
