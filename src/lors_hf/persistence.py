"""Saving, reloading and pushing LORS models with the ordinary transformers calls.

Mechanism (installed when ``lors_hf`` is imported; no model class changes, no remote code):

- ``config.json`` carries ``lors_config``: the resolved plan (every group's per-layer ranks).
- ``from_pretrained`` builds the dense model on the meta device, as always; right after that, before
  any weight is read, lors_hf rebuilds the LORS structure from ``lors_config`` (the same
  "config entry drives surgery at load time" idea as transformers' quantizers, hooked at the step
  where transformers plans the weights' dtypes). The checkpoint then fills the LORS weights.
  Any LORS weight missing from, or shaped differently in, the checkpoint raises a ValueError:
  transformers would otherwise leave it as uninitialised memory.
- ``save_pretrained`` of a LORS model writes only the shared and private weights, under the native
  key names (``save_original_format=False``, so DETR / ViT keys are not renamed and Trainer's resume
  restores them), plus one *guard* tensor stored under a dense weight's name with an impossible shape:
  stock transformers, without lors_hf, then refuses the checkpoint with a size-mismatch error instead
  of silently building a randomly initialised model. An empty tensor named `GUARD_NOTICE_KEY` goes
  with it: transformers' error itself only says "size mismatch", but the load report it prints just
  before lists that key, which tells the reader to install and import lors_hf. The save goes to a
  temporary folder first and only replaces files of an existing checkpoint once it has fully
  succeeded (other files in the folder, e.g. a tokenizer's, are kept); a model card (README.md) is
  written unless the folder already has one that lors_hf did not write, or that was edited since.
- ``load_state_dict`` of a LORS model drops the two guard tensors, so a strict
  ``model.load_state_dict(safetensors.torch.load_file(...))`` and Trainer's resume see exactly the
  model's own keys.
- ``push_to_hub`` uploads the same files, with the LORS model card unless the repository has a README.md that
  lors_hf did not write (kept, as stock ``push_to_hub`` keeps it, with the given tags added), and deletes the
  branch's earlier weight files that it does not rewrite (a stale ``model.safetensors`` next to new shards would
  be what loads). So does the push of a dense model (``merge_and_unload``'s) to a repository that holds a LORS
  checkpoint, which also deletes the LORS model card there.

State-dict layout of a LORS model (stable, versioned by ``LorsConfig.format_version``)::

    <stack parent>.lors_shared.<stack attr>.<relative path>.weight   # shared (out, in), once per stack
    <stack>.<i>.<relative path>.lors_A                                # (r_i, in)
    <stack>.<i>.<relative path>.lors_B                                # (out, r_i)
    <stack>.<i>.<relative path>.bias                                  # private bias, if the layer had one
    e.g. bert.encoder.lors_shared.layer.attention.self.query.weight, bert.encoder.layer.3.attention.self.query.lors_A
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import inspect
import os
import re
import shutil
import socket
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from .config import LorsConfig
from .discovery import plan_ranks, submodule_or_none
from .layer import LorsLinear, SharedWeight
from .surgery import WEIGHTS_LOADED, build_lors_layers, get_lors_config, is_lorsified

GUARD_MESSAGE = b"This is a LORS checkpoint: pip install lors-hf and `import lors_hf` before from_pretrained."
GUARD_NOTICE_KEY = "LORS_CHECKPOINT.needs_lors_hf.pip_install_lors-hf.then_import_lors_hf_before_from_pretrained"
"""Name of an empty tensor saved with the guard: stock transformers prints it in its load report."""
MODEL_CARD = "README.md"
CARD_STAMP = "<!-- written by lors-hf, text digest {digest}: once edited, lors-hf's saves keep this card -->"
_CARD_STAMP_PATTERN = re.compile(re.escape(CARD_STAMP).replace(re.escape("{digest}"), "([0-9a-f]{16})"))
STAGING_PREFIX = ".lors-saving-"
"""Name start of the hidden folder a save writes into before its files move into the checkpoint folder."""
_HUB_OPTIONS = ("commit_message", "commit_description", "private", "create_pr", "revision", "tags")
_HUB_WEIGHT_FILES = ("model.safetensors", "model-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors",
                     "model.safetensors.index.json")
"""Weight files (default variant, repository root) that a LORS ``push_to_hub`` replaces as a whole."""
_ORIGINALS: dict[str, Any] = {}


def guard_key(model: torch.nn.Module) -> str | None:
    """The dense weight name under which the guard tensor is saved (the first LORS layer's ``.weight``)."""
    for name, module in model.named_modules():
        if isinstance(module, LorsLinear):
            return f"{name}.weight"
    return None


def guard_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` adds to a LORS checkpoint so that stock transformers refuses it."""
    return {guard_key(model): torch.tensor(list(GUARD_MESSAGE), dtype=torch.uint8),
            GUARD_NOTICE_KEY: torch.zeros(0, dtype=torch.uint8)}


def lors_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of all LORS parameters (shared weights, private factors and biases) in `model`."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, LorsLinear | SharedWeight):
            names.update(f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False))
    return names


def _naming_roots(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The views of `model` under which a saved plan may name its modules.

    A plan names modules as the class that saved it saw them: ``bert.encoder.layer...`` for a model with a
    head, ``encoder.layer...`` for the bare ``BertModel``. Loading into the other kind of class (which
    transformers allows, moving the weights' ``base_model_prefix`` for them) needs the other view: the
    bare model inside a head model, or the bare model seen under its prefix.
    """
    roots: list[torch.nn.Module] = [model]
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), torch.nn.Module):
        roots.append(getattr(model, prefix))
    elif prefix:
        holder = torch.nn.Module()
        holder.add_module(prefix, model)
        roots.append(holder)
    return roots


def _prepare_lors_structure(model: PreTrainedModel) -> None:
    """Rebuild the LORS layers that ``model.config.lors_config`` describes (load time, before weights)."""
    if getattr(model.config, "lors_config", None) is None or is_lorsified(model):
        return
    config = get_lors_config(model)
    # transformers ties weights only once they are loaded; lorsify saw them tied (and left tied projections
    # dense, like Deformable DETR's box heads): tie them now, so discovery finds what lorsify found
    model.tie_weights()
    errors = []
    for root in _naming_roots(model):
        try:
            # the recorded plan as it is: a target or exclusion that names nothing in this class (the lm_head
            # of a causal LM loaded as its base model) is no error here
            stacks = plan_ranks(root, config, check_names=False)
            break
        except ValueError as err:
            errors.append(err)
    else:
        raise ValueError(
            f"This checkpoint's lors_config does not fit {type(model).__name__}: {errors[0]} "
            "(was config.json edited, or is it loaded into another architecture?)"
        ) from None
    build_lors_layers(root, stacks)
    ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    ignore.update("^" + re.escape(key) + "$" for view in (model, root) for key in guard_tensors(view))
    model._keys_to_ignore_on_load_unexpected = ignore


def _lands_on_dense_module(model: torch.nn.Module, key: str) -> bool:
    """True for a checkpoint LORS weight whose layer exists in `model` but is dense there."""
    if ".lors_shared." in f".{key}":
        parent = key.split("lors_shared.", 1)[0].rstrip(".")
        return not parent or submodule_or_none(model, parent) is not None
    module_name, _, leaf = key.rpartition(".")
    module = submodule_or_none(model, module_name)
    return leaf in ("lors_A", "lors_B") and module is not None and not isinstance(module, LorsLinear)


def _verify_lors_weights(model: PreTrainedModel, loading_info: Any, source: Any) -> None:
    """Refuse a checkpoint whose LORS weights are missing or shaped differently from its lors_config, or that
    is LORS while the config it came with has no lors_config (the guard notice is then an unexpected key)."""
    if getattr(model.config, "lors_config", None) is None and GUARD_NOTICE_KEY in loading_info.unexpected_keys:
        raise _lors_weights_without_plan(model)  # .bin files and state_dict loads, which the header check misses
    if not any(isinstance(m, LorsLinear) for m in model.modules()):
        return
    names = lors_parameter_names(model)
    missing = sorted(set(loading_info.missing_keys) & names)
    mismatched = sorted((k, tuple(a), tuple(b)) for k, a, b in loading_info.mismatched_keys if k in names)
    if missing:
        raise ValueError(
            f"The checkpoint at {source} lacks {len(missing)} LORS weights that its lors_config needs "
            f"(e.g. {missing[:3]}): the weights do not match lors_config. Re-save the model with "
            "save_pretrained, or check that config.json and the weights belong together."
        )
    if mismatched:
        name, saved, expected = mismatched[0]
        raise ValueError(
            f"The checkpoint at {source} holds LORS weights whose shapes do not match its lors_config: "
            f"{name} is {saved} in the file but lors_config needs {expected} ({len(mismatched)} such weights). "
            "config.json and the weights do not belong together."
        )
    misplaced = sorted(k for k in loading_info.unexpected_keys if _lands_on_dense_module(model, k))
    if misplaced:
        raise ValueError(
            f"The checkpoint at {source} holds {len(misplaced)} LORS weights of layers that its lors_config "
            f"leaves dense (e.g. {misplaced[:3]}), whose dense weights would then be left uninitialised: "
            "config.json and the weights do not belong together."
        )


def write_model_card(
    model: PreTrainedModel, directory: str | os.PathLike, repo_id: str | None = None, tags: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a README.md model card (YAML metadata, parameter report, how to load) for a LORS model.

    `repo_id` is the name the load instructions use (default: `directory`); `base_model` is filled in
    when ``model.config._name_or_path`` is a Hub name (``org/name``, not a local folder). A README.md
    there that is not a LORS model card (one of your own, or a LORS card edited since it was written) is a
    ValueError unless `overwrite` is True.

    Example:
        >>> # write_model_card(model, "out/my-lors-model", repo_id="me/my-lors-model")
    """
    from .report import parameter_report
    from .surgery import check_model

    check_model(model, "write_model_card")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"write_model_card takes the transformers model (its config names the class to load), got "
                        f"a {type(model).__name__}; pass the model inside it (e.g. wrapper.module).")
    config = get_lors_config(model)
    if config is None or not is_lorsified(model):
        raise ValueError(
            f"write_model_card: this {type(model).__name__} is not a LORS model (no LORS layers or no lors_config), "
            "so a LORS model card would describe it wrongly; lorsify it first, or for a dense model (e.g. after "
            "merge_and_unload) use transformers' own model card."
        )
    path = Path(directory) / MODEL_CARD
    if not overwrite and has_users_readme(directory):
        raise ValueError(
            f"write_model_card: {path} is not a LORS model card as lors-hf wrote it (your own README, or a card "
            "you edited); it is kept. Pass "
            "overwrite=True to replace it, or write the card into another folder."
        )
    report = parameter_report(model)
    base = str(getattr(model.config, "_name_or_path", "") or "")
    is_hub_name = re.fullmatch(r"[\w.-]+/[\w.-]+", base) is not None and not os.path.exists(base)
    base_model = base if is_hub_name else None
    name = repo_id or os.fspath(directory)
    auto_class = type(model).__name__
    all_tags = ["lors", "lors-hf", "low-rank"]
    all_tags += [t for t in [*(getattr(model, "model_tags", None) or []), *(tags or [])] if t not in all_tags]
    lines = ["---", "library_name: transformers", "tags:", *(f"- {tag}" for tag in all_tags)]
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines += ["---", "", f"# {name}", "",
              f"A **LORS** (Low-rank Residual Structure, CVPR 2024) version of `{auto_class}`"
              + (f", converted from [`{base_model}`](https://huggingface.co/{base_model})" if base_model else "")
              + ": the layers of each stack share one weight per projection and keep a private low-rank residual "
              "`W_i = W_shared + B_i @ A_i`.", "",
              "## Parameters", "", "```", str(report), "```", "",
              f"Initialisation: `{config.init}`; saved with lors_hf format {config.format_version}.", "",
              "## How to load", "", "```python",
              "import lors_hf  # pip install lors-hf: teaches from_pretrained the LORS layout",
              f"from transformers import {auto_class}",
              f'model = {auto_class}.from_pretrained("{name}")',
              "dense = lors_hf.merge_and_unload(model)  # optional: a stock transformers model", "```", ""]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)  # as save_pretrained does
    path.write_text(text + CARD_STAMP.format(digest=_card_digest(text)) + "\n", encoding="utf-8")
    return path


def _card_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _weight_files(variant: str | None) -> re.Pattern:
    """File names of a transformers safetensors checkpoint of `variant` (single file, shards, index)."""
    suffix = f".{variant}" if variant else ""
    return re.compile(rf"model{re.escape(suffix)}(-\d{{5}}-of-\d{{5}})?\.safetensors"
                      rf"|model\.safetensors\.index{re.escape(suffix)}\.json")


@contextlib.contextmanager
def staged_save(save_directory: str | os.PathLike, variant: str | None = None,
                replaced_together: Sequence[str] = ()) -> Iterator[Path]:
    """A temporary folder to write a checkpoint into, whose files replace those of `save_directory` only once
    the block has succeeded; on failure `save_directory` is left exactly as it was.

    Files of `save_directory` that the new checkpoint does not write (a tokenizer's) are kept, except weight
    files of the same `variant` that it no longer has (old shards) and, when the block writes any file that
    matches a glob of `replaced_together` (a tokenizer's files), the other files that match them.

    Example:
        >>> # with staged_save("out/model") as folder: model.save_pretrained(folder)
    """
    target = Path(save_directory)
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(target)
    # inside the target, on the file system its files live on (a mounted output folder is on another one than
    # its parent): the files can then move in by rename; transformers' loading ignores the hidden folder
    staging = Path(tempfile.mkdtemp(prefix=_own_staging_prefix() + f"{os.getpid()}-", dir=target))
    try:
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if created and not any(target.iterdir()):
                target.rmdir()  # leave no trace of a folder that did not exist
            raise
        weight_files = _weight_files(variant)

        def together(name: str) -> bool:
            return any(fnmatch.fnmatch(name, glob) for glob in replaced_together)

        writes_together = any(together(p.name) for p in staging.iterdir())
        stale = [p for p in target.iterdir() if p.is_file() and not (staging / p.name).exists()
                 and (weight_files.fullmatch(p.name) or (writes_together and together(p.name)))]
        # New weights first, then old shards out, config.json last: an interruption in between leaves
        # the old config with the new weights, which loading checks against each other.
        config = staging / "config.json"
        for path in staging.iterdir():
            if path != config:
                os.replace(path, target / path.name)
        for old in stale:
            old.unlink()
        if config.exists():
            os.replace(config, target / config.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _own_staging_prefix() -> str:
    """``.lors-saving-<host>-<pid namespace>-``: process ids are compared only within one host and namespace
    (containers can share a hostname and a volume while their process ids are separate)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{STAGING_PREFIX}{socket.gethostname()}-{namespace}-"


def _remove_abandoned_staging(target: Path) -> None:
    """Delete staging folders that a save on this machine left when its process was killed mid-way.

    Each is named after its host, process-id namespace and process id; one whose process is gone holds a
    half-written checkpoint that nothing will finish. Folders of live processes and of other machines or
    containers (a shared file system) stay.
    """
    if os.name != "posix":  # os.kill(pid, 0) only probes on POSIX
        return
    prefix = _own_staging_prefix()
    for path in target.glob(prefix + "*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _process_is_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def has_users_readme(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a README.md that is not a LORS model card: the user's own, which saves keep."""
    path = Path(directory) / MODEL_CARD
    return path.is_file() and not is_lors_model_card(path)


def is_lors_model_card(path: Path) -> bool:
    """True for a README.md that `write_model_card` wrote and nobody edited since (saves replace it).

    The card ends with a stamp holding a digest of the text above it; an edited card no longer matches it and is
    kept like any README of the user's own. A card with the ``lors-hf`` tag and no stamp (written before lors-hf
    stamped its cards) counts as unedited.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    metadata = text.split("\n---", 1)[0] if text.startswith("---") else ""
    if "\n- lors-hf\n" not in metadata + "\n":
        return False
    stamp = _CARD_STAMP_PATTERN.search(text)
    return stamp is None or (stamp.end() == len(text.rstrip("\n")) and _card_digest(text[:stamp.start()]) == stamp[1])


def _save_lors_pretrained(original, self: PreTrainedModel, save_directory, *args: Any, **kwargs: Any):
    if args:  # e.g. save_pretrained(path, True): bind by name so the LORS handling still applies
        names = list(inspect.signature(original).parameters)[2:2 + len(args)]
        for name, value in zip(names, args, strict=True):
            if name in kwargs:
                raise TypeError(f"save_pretrained() got multiple values for argument {name!r}")
            kwargs[name] = value
    if not is_lorsified(self):
        if getattr(self.config, "lors_config", None) is not None:
            raise ValueError(
                f"save_pretrained: this {type(self).__name__} has a lors_config but dense layers (a model built "
                "with from_config or the class itself from a LORS checkpoint's config); its checkpoint would not "
                "load. Build the LORS layers with lors_hf.lorsify(model, lors_hf.get_lors_config(model)), or save "
                "it as a dense model after `del model.config.lors_config`."
            )
        if (kwargs.get("is_main_process", True) and not kwargs.get("push_to_hub")
                and _holds_lors_weights(_weight_files_in(save_directory, kwargs.get("variant")))):
            # a dense model (merge_and_unload's) replacing a LORS checkpoint: stock save_pretrained removes only
            # stale shards, and a LORS model.safetensors left next to new shards would be what loads
            with staged_save(save_directory, kwargs.get("variant")) as staging:
                result = original(self, staging, **kwargs)
            card = Path(save_directory) / MODEL_CARD
            if card.is_file() and is_lors_model_card(card):  # the replaced checkpoint's card (as `lors-hf merge`)
                card.unlink()
            return result
        return original(self, save_directory, **kwargs)
    if getattr(self.config, "lors_config", None) is None:
        raise _lors_layers_without_plan(self)
    if not kwargs.get("is_main_process", True):
        return original(self, save_directory, **kwargs)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_pretrained: {save_directory} is a file; give a directory.")
    push = kwargs.pop("push_to_hub", False)
    repo_id = kwargs.pop("repo_id", None)
    hub_options = {name: kwargs.pop(name) for name in _HUB_OPTIONS if name in kwargs}
    if "save_original_format" in inspect.signature(original).parameters:
        kwargs["save_original_format"] = False  # native key names: no renaming, exact Trainer resume
    state_dict = kwargs.get("state_dict")
    state_dict = dict(self.state_dict() if state_dict is None else state_dict)
    state_dict.update(guard_tensors(self))
    kwargs["state_dict"] = state_dict
    target = Path(save_directory)
    with staged_save(target, kwargs.get("variant")) as staging:
        result = original(self, staging, **kwargs)
        if not has_users_readme(target):
            write_model_card(self, staging, repo_id=repo_id or os.fspath(save_directory))
    if push:
        self.push_to_hub(repo_id or target.name, token=kwargs.get("token"),
                         max_shard_size=kwargs.get("max_shard_size", "50GB"), **hub_options)
    return result


def _lors_layers_without_plan(model: PreTrainedModel) -> ValueError:
    """The error for saving a model with LORS layers but no ``lors_config`` of its own: `lorsify` ran on a part
    of it (``model.bert``), whose config copy holds the plan, so the saved checkpoint would not load."""
    part = next((name for name, module in model.named_modules() if module is not model
                 and getattr(getattr(module, "config", None), "lors_config", None) is not None), None)
    where = f" (`lorsify` ran on its part `{part}`, whose own config holds the plan)" if part else ""
    return ValueError(
        f"save_pretrained: this {type(model).__name__} has LORS layers but no lors_config{where}, so its checkpoint "
        "would not load. Lorsify the model you save, e.g. lors_hf.lorsify(model, config) on the whole model (it "
        f"finds the stacks inside{f' `{part}`' if part else ''}), or save {f'`{part}`' if part else 'that part'} "
        "on its own."
    )


def ensure_branch(api: Any, repo_id: str, revision: str | None, token: str | None = None) -> None:
    """Create branch `revision` of `repo_id` if it does not exist yet (what stock ``push_to_hub`` does);
    nothing for the default branch or a pull-request ref.

    Example:
        >>> # ensure_branch(HfApi(), "me/model", "dev")
    """
    if revision and not revision.startswith("refs/pr/") and revision != "main":
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)


def _push_lors_to_hub(original, self: PreTrainedModel, repo_id: str, *args: Any, **kwargs: Any):
    if args:
        return original(self, repo_id, *args, **kwargs)
    from huggingface_hub import HfApi

    api = HfApi()
    token, revision = kwargs.get("token"), kwargs.get("revision")
    lors = is_lorsified(self)

    def create_repo() -> str:
        return api.create_repo(repo_id, private=kwargs.get("private"), token=token, exist_ok=True).repo_id

    if not lors:  # a dense model: stock push (which creates the repository itself), unless it replaces a LORS one
        if re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id) is None:
            repo_id = create_repo()  # a name without its namespace: resolved first, to read its config.json
        if not _hub_repo_is_lors(api, repo_id, revision, token):
            return original(self, repo_id, **kwargs)
    repo_id = create_repo()
    ensure_branch(api, repo_id, revision, token)
    # the previous push's weight files that this one does not rewrite: a single model.safetensors left next to
    # new shards would be what from_pretrained loads (it prefers it to the shards' index)
    stale = list(_HUB_WEIGHT_FILES)
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as hub_card:
        self.save_pretrained(folder, max_shard_size=kwargs.get("max_shard_size") or "50GB")
        tags = kwargs.get("tags")
        tags = [tags] if isinstance(tags, str) else tags
        if _download_from_hub(api, repo_id, MODEL_CARD, revision, token, hub_card) and has_users_readme(hub_card):
            _keep_users_card(Path(hub_card) / MODEL_CARD, Path(folder) / MODEL_CARD, tags)  # as stock push does
        elif lors:
            write_model_card(self, folder, repo_id=repo_id, tags=tags)
        else:
            stale.append(MODEL_CARD)  # the LORS card of the checkpoint this dense one replaces
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, token=token, revision=revision,
            commit_message=kwargs.get("commit_message") or ("Upload LORS model (lors-hf)" if lors else "Upload model"),
            commit_description=kwargs.get("commit_description"), create_pr=kwargs.get("create_pr", False),
            delete_patterns=stale,
        )


def _hub_repo_is_lors(api: Any, repo_id: str, revision: str | None, token: Any) -> bool:
    """Whether `repo_id` at `revision` holds a LORS checkpoint (its config.json has a lors_config)."""
    import json

    with tempfile.TemporaryDirectory() as folder:
        path = _download_from_hub(api, repo_id, "config.json", revision, token, folder)
        try:
            return path is not None and json.loads(path.read_text(encoding="utf-8")).get("lors_config") is not None
        except (ValueError, AttributeError):
            return False


def _download_from_hub(api: Any, repo_id: str, filename: str, revision: str | None, token: Any,
                       folder: str) -> Path | None:
    """Download `filename` of `repo_id` at `revision` into `folder`; None when the repository, the revision or the
    file does not exist, or the token is refused (401: the stock push that follows fails with its own error)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(api.hf_hub_download(repo_id, filename, revision=revision, token=token, local_dir=folder))
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return None
    except HfHubHTTPError as err:
        if getattr(err.response, "status_code", None) != 401:
            raise
        return None


def _keep_users_card(source: Path, target: Path, tags: Sequence[str] | None) -> None:
    """Copy the user's own model card to `target`, with `tags` added to its metadata."""
    from huggingface_hub import ModelCard

    if not tags:
        shutil.copyfile(source, target)
        return
    card = ModelCard.load(source)
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
    card.save(target)


def _weight_files_in(directory: str | os.PathLike, variant: str | None) -> list[Path]:
    """The safetensors weight files of `variant` in `directory` (none when it is not a directory)."""
    folder = Path(directory)
    pattern = _weight_files(variant)
    return [p for p in folder.iterdir() if pattern.fullmatch(p.name)] if folder.is_dir() else []


def _holds_lors_weights(files: Sequence[str | os.PathLike] | None) -> bool:
    """Whether any of these checkpoint files is a LORS one (its safetensors header lists the guard notice)."""
    from safetensors import safe_open

    for file in files or ():
        if str(file).endswith(".safetensors") and os.path.isfile(file):
            try:
                with safe_open(file, framework="pt") as handle:
                    if GUARD_NOTICE_KEY in handle.keys():
                        return True
            except Exception:  # an unreadable file: transformers' own loading reports it
                continue
    return False


def _lors_weights_without_plan(model: PreTrainedModel) -> ValueError:
    return ValueError(
        f"{type(model).__name__}.from_pretrained: the checkpoint holds LORS weights, but the config it was given "
        "has no lors_config to rebuild the LORS layers from (a sub-model of a composite LORS model, such as "
        "CLIPModel's text or vision model, or a config.json without its lors_config). Load the class that saved "
        "it and take the part you need (e.g. CLIPModel.from_pretrained(path).vision_model), or make it dense "
        "first with `lors-hf merge`."
    )


def _load_with_lors(original, model: PreTrainedModel, *args: Any, **kwargs: Any):
    """Wraps ``PreTrainedModel._load_pretrained_model``: clear errors for unreadable LORS checkpoints, and for
    LORS weights loaded into a model whose config has no plan for them."""
    files = args[1] if len(args) > 1 else kwargs.get("checkpoint_files")
    if getattr(model.config, "lors_config", None) is None:
        if _holds_lors_weights(files):
            # e.g. CLIPVisionModel from a LORS CLIPModel checkpoint: the plan is on the composite config, the
            # sub-model's config has none, and the vision projections were left randomly initialised
            raise _lors_weights_without_plan(model)
        return original(model, *args, **kwargs)
    try:
        return original(model, *args, **kwargs)
    except Exception as err:
        if type(err).__name__ != "SafetensorError" and not isinstance(err, EOFError | OSError):
            raise
        raise ValueError(
            f"Could not read the LORS checkpoint {files}: {err}. The file is truncated or corrupted; "
            "save or download it again."
        ) from err


def _without_guard_tensors(model: PreTrainedModel, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """`state_dict` less the guard tensors `save_pretrained` added (for ``load_state_dict``)."""
    guards = {guard_key(model), GUARD_NOTICE_KEY}
    if None in guards or not isinstance(state_dict, Mapping) or not guards & state_dict.keys():
        return state_dict  # a dense model, or no guard to drop
    kept = OrderedDict((k, v) for k, v in state_dict.items()
                       if not (k in guards and isinstance(v, torch.Tensor) and v.dtype == torch.uint8))
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        kept._metadata = metadata
    return kept


def _refuse_lors_weights_for_dense_layers(model: PreTrainedModel, state_dict: Mapping[str, Any]) -> None:
    """A ValueError when a LORS state dict is loaded into a model without LORS layers (``from_config`` of a LORS
    config, or the dense model before `lorsify`): strict loading listed every key as missing or unexpected without
    the fix, and ``strict=False`` left every targeted projection at its random initialisation, silently."""
    if not isinstance(state_dict, Mapping) or is_lorsified(model):
        return
    lors_keys = [key for key in state_dict if isinstance(key, str)
                 and (key.endswith((".lors_A", ".lors_B")) or ".lors_shared." in f".{key}")]
    if not lors_keys or not any(_lands_on_dense_module(model, key) for key in lors_keys):
        return
    how = ("lors_hf.lorsify(model, lors_hf.get_lors_config(model))" if get_lors_config(model) is not None
           else "lors_hf.lorsify(model, <the LorsConfig it was converted with>)")
    raise ValueError(
        f"load_state_dict: the state dict holds LORS weights ({len(lors_keys)}, e.g. {lors_keys[0]!r}) but this "
        f"{type(model).__name__} has dense layers, which would keep their random initialisation. Build the LORS "
        f"layers first with {how}, then load; or load a LORS checkpoint folder with from_pretrained."
    )


def install() -> None:
    """Install the load / save / push hooks on ``PreTrainedModel`` (idempotent; done on import)."""
    if _ORIGINALS:
        return
    for name in ("_get_dtype_plan", "_finalize_model_loading", "_load_pretrained_model", "save_pretrained",
                 "push_to_hub", "load_state_dict"):
        _ORIGINALS[name] = getattr(PreTrainedModel, name)
    get_dtype_plan, finalize = _ORIGINALS["_get_dtype_plan"], _ORIGINALS["_finalize_model_loading"]
    load, save, push = (_ORIGINALS[k] for k in ("_load_pretrained_model", "save_pretrained", "push_to_hub"))
    load_state_dict = _ORIGINALS["load_state_dict"]

    @functools.wraps(get_dtype_plan)
    def _get_dtype_plan(self, *args, **kwargs):
        _prepare_lors_structure(self)  # right after the (meta) model is built, before any weight is read
        return get_dtype_plan(self, *args, **kwargs)

    @functools.wraps(load)
    def _load_pretrained_model(model, *args, **kwargs):
        return _load_with_lors(load, model, *args, **kwargs)

    @functools.wraps(finalize)
    def _finalize_model_loading(model, load_config, loading_info, *args, **kwargs):
        _verify_lors_weights(model, loading_info, getattr(load_config, "pretrained_model_name_or_path", "?"))
        setattr(model, WEIGHTS_LOADED, True)
        return finalize(model, load_config, loading_info, *args, **kwargs)

    @functools.wraps(save)
    def save_pretrained(self, save_directory, *args, **kwargs):
        return _save_lors_pretrained(save, self, save_directory, *args, **kwargs)

    @functools.wraps(push)
    def push_to_hub(self, repo_id, *args, **kwargs):
        return _push_lors_to_hub(push, self, repo_id, *args, **kwargs)

    @functools.wraps(load_state_dict)
    def _load_state_dict(self, state_dict, *args, **kwargs):
        _refuse_lors_weights_for_dense_layers(self, state_dict)
        result = load_state_dict(self, _without_guard_tensors(self, state_dict), *args, **kwargs)
        setattr(self, WEIGHTS_LOADED, True)
        return result

    PreTrainedModel._get_dtype_plan = _get_dtype_plan
    PreTrainedModel.load_state_dict = _load_state_dict
    PreTrainedModel._load_pretrained_model = staticmethod(_load_pretrained_model)
    PreTrainedModel._finalize_model_loading = staticmethod(_finalize_model_loading)
    PreTrainedModel.save_pretrained = save_pretrained
    PreTrainedModel.push_to_hub = push_to_hub


def load_lors_config(path: str | os.PathLike) -> LorsConfig | None:
    """The `LorsConfig` of a saved checkpoint directory (None for a dense checkpoint)."""
    import json

    data = json.loads((Path(path) / "config.json").read_text())
    return None if data.get("lors_config") is None else LorsConfig.from_dict(data["lors_config"])
