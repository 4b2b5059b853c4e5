"""A model folder's safetensors weights, read strictly (for model.CausalLM.from_pretrained): model.safetensors, or the
shards that model.safetensors.index.json lists. Every mistake is a UserError naming the file and the key: a missing,
unexpected or wrongly shaped weight, a missing shard, a truncated or foreign file. Nothing is unpickled."""
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

from infra.cli import UserError, read_json


def read_weights(folder: Path, shapes: dict, dtype, optional: str) -> tuple[dict[str, Tensor], dict[str, Path]]:
    """(tensors, file of each key): exactly the keys of `shapes`, plus `optional` if the folder has it, in `dtype`.
    Each file's shapes are checked against `shapes` before its tensors are read (`optional`'s is not checked)."""
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index.is_file():
        key_file = {k: folder / f for k, f in read_json(index)["weight_map"].items()}
    elif single.is_file():
        with _open(single) as f:
            key_file = dict.fromkeys(f.keys(), single)
    else:
        raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json (pickled .bin "
                        f"weights are never loaded; convert them to safetensors first)")
    if missing := sorted(set(shapes) - set(key_file)):
        raise UserError(f"{index if index.is_file() else single}: missing weights {missing[:8]} ({len(missing)})")
    if unexpected := sorted(set(key_file) - set(shapes) - {optional}):
        raise UserError(f"{key_file[unexpected[0]]}: unexpected weights {unexpected[:8]}")
    tensors = {}
    for file in sorted(set(key_file.values())):
        keys = [k for k, f in key_file.items() if f == file]
        with _open(file) as f:
            if absent := sorted(set(keys) - set(f.keys())):
                raise UserError(f"{file}: missing weights {absent[:8]} (listed in model.safetensors.index.json)")
            for k in keys:
                shape = f.get_slice(k).get_shape()
                if k in shapes and list(shapes[k]) != list(shape):
                    raise UserError(f"{file}: {k} has shape {list(shape)}, the config implies {list(shapes[k])}")
                tensors[k] = f.get_tensor(k).to(dtype)
    return tensors, key_file


def _open(file: Path):
    """safe_open, with a missing shard or a truncated / foreign file as a UserError naming it."""
    if not file.is_file():
        raise UserError(f"{file}: no such file (listed in model.safetensors.index.json)")
    try:
        return safe_open(file, "pt")
    except SafetensorError as e:
        raise UserError(f"{file}: not a readable safetensors file ({e}); download or save it again") from None
