"""Every Hugging Face Hub download: a model folder (resolve_model_dir, load_model), a dataset split's parquet files,
one file of a dataset or space. `fetch` is the one place where a Hub failure (offline and not cached, unreachable,
no such repo, revision or file, an invalid id) becomes a one-line UserError.
"""
import re
from fnmatch import fnmatch
from pathlib import Path

import torch

from infra.cli import UserError
from model import CausalLM, TOKENIZER_FILES

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def fetch(download, message) -> Path:
    """download() (a huggingface_hub call) as a Path; any Hub failure is UserError(message(e)), one line, e the
    exception (its type names what went wrong)."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    try:
        return Path(download())
    except (OSError, HfHubHTTPError, HFValidationError) as e:  # LocalEntryNotFoundError, connection errors: OSErrors
        raise UserError(message(e)) from None


def resolve_model_dir(name_or_path: str, revision: str | None = None) -> Path:
    """A local folder as is, else a Hub repo id fetched by `huggingface_hub.snapshot_download` (config, safetensors,
    index and tokenizer files only: never pickled `.bin` weights). Hub ids look like `name` or `owner/name`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model folder (no config.json)")
    if path.is_dir():
        return path
    if path.exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name_or_path) or name_or_path.startswith("."):
        raise UserError(f"model folder {name_or_path!r} does not exist (give a folder with config.json and "
                        f"*.safetensors, or a Hub id such as {DEFAULT_MODEL})")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]

    def message(e):
        if isinstance(e, (RepositoryNotFoundError, RevisionNotFoundError)):
            return f"{name_or_path!r} (revision {revision}) is neither a local folder nor a Hub repo"
        return (f"{name_or_path!r} is not a local folder and the Hugging Face Hub is unreachable (repo not cached, "
                f"{type(e).__name__}): download it where there is network and pass the local folder instead")
    return fetch(lambda: snapshot_download(name_or_path, revision=revision, allow_patterns=patterns), message)


def load_model(name_or_path: str, revision: str | None = None, dtype=torch.float32) -> CausalLM:
    """CausalLM.from_pretrained of a local folder or a Hub id (downloaded first), in eval mode."""
    return CausalLM.from_pretrained(resolve_model_dir(name_or_path, revision), dtype=dtype)


def dataset_files(repo: str, split: str, revision: str | None) -> list[Path]:
    """Download only the split's parquet files of a Hub dataset (data/{split}-*.parquet or {split}/*.parquet)."""
    from huggingface_hub import snapshot_download
    patterns = [f"{split}-*.parquet", f"*/{split}-*.parquet", f"{split}/*.parquet", f"*/{split}/*.parquet"]
    root = fetch(lambda: snapshot_download(repo, repo_type="dataset", revision=revision, allow_patterns=patterns),
                 lambda e: f"{repo}: could not get split {split!r} from the Hugging Face Hub ({type(e).__name__}); "
                           "offline? pass a local .jsonl, .json or .parquet file instead (--data my_prefs.jsonl)")
    files = sorted(p for p in root.rglob("*.parquet") if any(fnmatch(p.relative_to(root).as_posix(), pat)
                                                              for pat in patterns))
    if not files:
        raise UserError(f"{repo}: no parquet files for split {split!r} (looked for {', '.join(patterns)})")
    return files


def hub_file(repo: str, filename: str, repo_type: str, fix: str, revision: str | None = None) -> Path:
    """One file of a Hub model, dataset or space (huggingface_hub's cache); UserError ending with `fix` if
    unreachable."""
    from huggingface_hub import hf_hub_download
    return fetch(lambda: hf_hub_download(repo, filename, repo_type=repo_type, revision=revision),
                 lambda e: f"cannot download {filename} of the Hub {repo_type} {repo} ({type(e).__name__}); {fix}")
