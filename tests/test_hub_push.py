"""``push_to_hub`` of a LORS model to the local Hub (tests/hub_server.py), then ``from_pretrained``
from the Hub in a fresh process. The Hub checks the token on every request and takes the weights through
Git LFS, as the real one does.

Clients run in subprocesses so that ``HF_ENDPOINT`` is set before huggingface_hub is imported.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import HUB_TOKEN
from tiny_models import build

from lors_hf import lorsify, write_model_card
from lors_hf.persistence import GUARD_MESSAGE

TESTS_DIR = Path(__file__).resolve().parent
REPO = "me/lors-bert"
SAVE_AND_PUSH_REPO = "me/lors-bert-via-save"
BASE_MODEL = "org/tiny-bert"

PUSH_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import lors_hf
from tiny_models import build, main_output

work, repo, save_repo, base = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
model, inputs = build("bert")
lors_hf.lorsify(model, rank=[1, 2, 3])
generator = torch.Generator().manual_seed(7)
with torch.no_grad():
    for parameter in model.parameters():
        parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
model.config._name_or_path = base
commit = model.push_to_hub(repo, commit_message="Upload a LORS model", tags=["demo"])
model.push_to_hub(repo, revision="dev", commit_message="Upload to a new branch")  # created as stock does
model.save_pretrained(work / "local", push_to_hub=True, repo_id=save_repo, commit_message="via save_pretrained")
with torch.no_grad():
    torch.save({"inputs": inputs, "output": main_output(model(**inputs))}, work / "expected.pt")
report = lors_hf.parameter_report(model)
print(json.dumps({
    "commit": commit.oid,
    "lors_config": model.config.lors_config,
    "report": str(report),
    "lors_parameters": report.total.lors,
    "dense_parameters": report.total.dense,
    "state_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
}))
"""

PULL_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import lors_hf
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification
from tiny_models import main_output

work, repo = Path(sys.argv[1]), sys.argv[2]
expected = torch.load(work / "expected.pt")
results = {}
for loader in (AutoModelForSequenceClassification, BertForSequenceClassification):
    model = loader.from_pretrained(repo).eval()
    with torch.no_grad():
        out = main_output(model(**expected["inputs"]))
    results[loader.__name__] = {"lorsified": lors_hf.is_lorsified(model), "equal": torch.equal(out, expected["output"])}
print(json.dumps(results))
"""


def _client_env(endpoint: str, home: Path) -> dict[str, str]:
    """Environment for a client subprocess that talks only to the local Hub at `endpoint`."""
    proxies = {"http_proxy", "https_proxy", "all_proxy"}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_")) and k.lower() not in proxies}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="0", HF_TOKEN=HUB_TOKEN, HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HOME=str(home), NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost",
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
    return env


def _run(script: str, env: dict[str, str], *args: str) -> dict:
    """Run `script` in a fresh interpreter; return the JSON it prints last."""
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _front_matter(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


@pytest.mark.slow
def test_push_to_hub_then_from_pretrained(guarded_hub, tmp_path):
    pushed = _run(PUSH_SCRIPT, _client_env(guarded_hub.endpoint, tmp_path / "home-push"),
                  str(tmp_path), REPO, SAVE_AND_PUSH_REPO, BASE_MODEL)

    files = guarded_hub.files(REPO, revision=pushed["commit"])
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert json.loads(files["config.json"])["lors_config"] == pushed["lors_config"]

    assert "model.safetensors" in guarded_hub.lfs_paths(REPO)
    weights = files["model.safetensors"]  # compact: the LORS parameters and the guard, nothing dense
    (header_length,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8 : 8 + header_length])
    data_bytes = len(weights) - 8 - header_length
    assert data_bytes == pushed["state_bytes"] + len(GUARD_MESSAGE)
    assert abs(data_bytes - 4 * pushed["lors_parameters"]) <= 0.01 * 4 * pushed["lors_parameters"]
    assert pushed["lors_parameters"] < 0.8 * pushed["dense_parameters"]
    assert "bert.encoder.lors_shared.layer.attention.self.query.weight" in header

    readme = files["README.md"]
    meta = _front_matter(readme)
    assert meta["library_name"] == "transformers"
    assert {"lors", "demo"} <= set(meta["tags"])
    assert meta["base_model"] == BASE_MODEL
    card = readme.decode()
    assert pushed["report"] in card  # the parameter report
    assert "import lors_hf" in card and f'from_pretrained("{REPO}")' in card  # how to load
    assert guarded_hub.commits(REPO)[0]["title"] == "Upload a LORS model"
    assert guarded_hub.commits(REPO, revision="dev")[0]["title"] == "Upload to a new branch"
    assert guarded_hub.files(REPO, revision="dev")["model.safetensors"] == files["model.safetensors"]

    via_save = guarded_hub.files(SAVE_AND_PUSH_REPO)
    assert {"config.json", "model.safetensors", "README.md"} <= set(via_save)
    assert via_save["model.safetensors"] == weights
    assert guarded_hub.commits(SAVE_AND_PUSH_REPO)[0]["title"] == "via save_pretrained"
    assert (tmp_path / "local" / "model.safetensors").read_bytes() == weights

    pulled = _run(PULL_SCRIPT, _client_env(guarded_hub.endpoint, tmp_path / "home-pull"), str(tmp_path), REPO)
    assert pulled == {loader: {"lorsified": True, "equal": True}
                      for loader in ("AutoModelForSequenceClassification", "BertForSequenceClassification")}


def test_model_card_names_a_base_model_only_for_hub_names(tmp_path, monkeypatch):
    model, _ = build("bert")
    lorsify(model, rank=2)
    monkeypatch.chdir(tmp_path)
    Path("my", "model").mkdir(parents=True)  # a local folder that looks like a Hub name
    for name_or_path, expected in [(BASE_MODEL, BASE_MODEL), ("my/model", None), (str(tmp_path), None), ("", None)]:
        model.config._name_or_path = name_or_path
        card = write_model_card(model, tmp_path, repo_id="me/card")
        assert _front_matter(card.read_bytes()).get("base_model") == expected, name_or_path
    assert 'from_pretrained("me/card")' in card.read_text()


UPDATE_SCRIPT = r"""
import json, sys
import torch
torch.set_num_threads(1)
import lors_hf
from huggingface_hub import HfApi
from transformers import AutoModelForCausalLM
from tiny_models import build

repo = sys.argv[1]
api = HfApi()
model, inputs = build("gpt2")
lors_hf.lorsify(model, rank=2)
files, equal = {}, {}
for step, shard_size in enumerate(["50GB", "20KB", "50GB"]):  # single file, sharded, single file again
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
        expected = model(**inputs).logits
    model.push_to_hub(repo, revision="dev", max_shard_size=shard_size, commit_message=f"update {step}")
    files[step] = sorted(f for f in api.list_repo_files(repo, revision="dev") if f.startswith("model"))
    reloaded = AutoModelForCausalLM.from_pretrained(repo, revision="dev").eval()
    with torch.no_grad():
        equal[step] = torch.equal(reloaded(**inputs).logits, expected)
print(json.dumps({"files": files, "equal": equal}))
"""


def test_pushing_an_update_with_other_shards_leaves_no_stale_weight_files(guarded_hub, tmp_path):
    """A sharded push after a single-file one used to leave the old model.safetensors on the branch, and
    from_pretrained (which prefers it to the shards' index) silently loaded the previous weights."""
    result = _run(UPDATE_SCRIPT, _client_env(guarded_hub.endpoint, tmp_path / "home"), "me/updated")
    shards = [f"model-0000{i}-of-00006.safetensors" for i in range(1, 7)]
    assert result["equal"] == {"0": True, "1": True, "2": True}
    assert result["files"] == {"0": ["model.safetensors"], "1": [*shards, "model.safetensors.index.json"],
                               "2": ["model.safetensors"]}


USERS_CARD = b"---\nlicense: mit\ntags:\n- mine\n---\n# My model\n\nWritten by hand.\n"

USERS_CARD_SCRIPT = r"""
import io, json, sys
import torch
torch.set_num_threads(1)
import lors_hf
from huggingface_hub import HfApi, hf_hub_download
from tiny_models import build

repo, card = sys.argv[1], sys.argv[2].encode()
api = HfApi()
api.create_repo(repo)
api.upload_file(path_or_fileobj=io.BytesIO(card), path_in_repo="README.md", repo_id=repo)
model, _ = build("bert")
lors_hf.lorsify(model, rank=2)
model.push_to_hub(repo)
first = open(hf_hub_download(repo, "README.md"), encoding="utf-8").read()
model.push_to_hub(repo, tags=["extra"])
second = open(hf_hub_download(repo, "README.md"), encoding="utf-8").read()
print(json.dumps({"first": first, "second": second}))
"""


def test_push_keeps_a_users_own_model_card_on_the_hub(guarded_hub, tmp_path):
    """As stock push_to_hub does (and a local save does): the user's README.md in the repository stays; it used
    to be replaced by the LORS card."""
    cards = _run(USERS_CARD_SCRIPT, _client_env(guarded_hub.endpoint, tmp_path / "home"), "me/carded",
                 USERS_CARD.decode())
    assert cards["first"] == USERS_CARD.decode()
    assert "Written by hand." in cards["second"]
    assert _front_matter(cards["second"].encode())["tags"] == ["mine", "extra"]
    assert "lors-hf" not in cards["second"]


MERGED_SCRIPT = r"""
import json, sys
import torch
torch.set_num_threads(1)
import lors_hf
from huggingface_hub import HfApi
from transformers import AutoModelForCausalLM
from tiny_models import build

repo = sys.argv[1]
model, inputs = build("gpt2")
lors_hf.lorsify(model, rank=2)
model.push_to_hub(repo)
merged = lors_hf.merge_and_unload(model).eval()
with torch.no_grad():
    expected = merged(**inputs).logits
merged.push_to_hub(repo, max_shard_size="20KB", commit_message="dense")
reloaded = AutoModelForCausalLM.from_pretrained(repo).eval()
with torch.no_grad():
    equal = torch.equal(reloaded(**inputs).logits, expected)
files = sorted(HfApi().list_repo_files(repo))
print(json.dumps({"files": files, "equal": equal, "lorsified": lors_hf.is_lorsified(reloaded)}))
"""


def test_pushing_the_merged_model_over_its_lors_repository_replaces_the_lors_files(guarded_hub, tmp_path):
    """Stock push_to_hub of merge_and_unload's model, sharded, left the LORS model.safetensors (which loads
    first: the repository no longer loaded) and the LORS model card (wrong for a dense model)."""
    result = _run(MERGED_SCRIPT, _client_env(guarded_hub.endpoint, tmp_path / "home"), "me/merged")
    assert result["equal"] and not result["lorsified"]
    assert "model.safetensors" not in result["files"] and "model.safetensors.index.json" in result["files"]
    assert "README.md" not in result["files"]


DENSE_PUSH_SCRIPT = r"""
import json, sys
import torch
torch.set_num_threads(1)
if sys.argv[1] == "lors":
    import lors_hf  # noqa: F401
from tiny_models import build

model, _ = build("bert")
model.push_to_hub("me/dense")  # a new repository
model.push_to_hub("me/dense", commit_message="again")  # an existing (dense) one
try:
    model.push_to_hub("me/dense", token="not-the-token")
    error = None
except Exception as err:
    error = f"{type(err).__name__}: {err}"
print(json.dumps({"error": error}))
"""


def test_dense_push_makes_the_stock_requests_besides_reading_config_json(guarded_hub, tmp_path):
    """A dense model's push_to_hub with lors_hf imported created the repository once more than stock push (one
    more request per push). Its error for a wrong token stays stock push's. The one difference left: it reads
    config.json, to tell whether it replaces a LORS checkpoint."""
    from hub_server import LocalHub

    with LocalHub(token=HUB_TOKEN, lfs_threshold=1024) as stock_hub:
        stock = _run(DENSE_PUSH_SCRIPT, _client_env(stock_hub.endpoint, tmp_path / "home1"), "stock")
        expected = stock_hub.requests
    hooked = _run(DENSE_PUSH_SCRIPT, _client_env(guarded_hub.endpoint, tmp_path / "home2"), "lors")
    assert hooked["error"].replace(guarded_hub.endpoint, "") == stock["error"].replace(stock_hub.endpoint, "")
    assert stock["error"] is not None and "/api/repos/create" in stock["error"]
    requests = [r for r in guarded_hub.requests if not r[1].endswith("/config.json")]
    # as multisets: huggingface_hub uploads a commit's LFS files in parallel, in no fixed order
    assert sorted(requests) == sorted(expected)
