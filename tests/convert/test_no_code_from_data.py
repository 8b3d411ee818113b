"""Loading a model folder, a training workdir or a tokenizer never imports or calls what a file names.

Each hostile file names `hostile_mod`, a module on sys.path that writes a marker file when it is imported;
every loader must refuse the file with an error naming it, and the marker must never appear.
"""

from __future__ import annotations

import builtins
import json
import shutil
import sys

import pytest
from flax import nnx

from llava_jax import convert
from llava_jax.convert.__main__ import main as convert_main
from llava_jax.infer.generate import ModelLoadError, load_model
from llava_jax.models.clip_vit import CLIPVisionConfig
from llava_jax.models.llama import LlamaConfig, LlamaForCausalLM
from tests.convert import helpers

LLAMA = "llava_jax.models.llama:LlamaForCausalLM"
HOSTILE_MODEL_JSON = {
    "model type": lambda m: {**m, "model": "hostile_mod:Boom"},
    "builtin callable": lambda m: {**m, "model": "builtins:eval"},
    "config type": lambda m: {**m, "config": {**m["config"], "__dataclass__": "hostile_mod:Config"}},
    "dtype": lambda m: {**m, "config": {**m["config"], "dtype": {"__dtype__": "hostile_mod"}}},
    "config of another model": lambda m: {**m, "config": {"__dataclass__": "llava_jax.models.clip_vit:"
                                                          "CLIPVisionConfig"}},
    "unknown field": lambda m: {**m, "config": {**m["config"], "hostile_mod": 1}},
    "not an object": lambda m: ["hostile_mod:Boom"],
}


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """(marker file, prompts answered): `hostile_mod` importable from sys.path; any y/N prompt answered yes."""
    marker = tmp_path / "IMPORTED"
    code = f"open({str(marker)!r}, 'w').write('imported')\nclass Boom:\n    pass\nclass Config:\n    pass\n"
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "hostile_mod.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    prompts = []
    monkeypatch.setattr(builtins, "input", lambda *a: prompts.append(a) or "y")
    yield marker, prompts
    assert not marker.exists() and "hostile_mod" not in sys.modules
    assert prompts == []


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A tiny LLaMA in our format with a tokenizer."""
    path = tmp_path_factory.mktemp("ours") / "model"
    cfg = LlamaConfig(vocab_size=helpers.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    convert.save(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), path)
    helpers.save_tiny_tokenizer(path, size=helpers.VOCAB)
    return path


def with_model_json(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    (dst / "model.json").write_text(json.dumps(edit(json.loads((src / "model.json").read_text()))))


def test_our_format_loads_through_the_allow_lists(ours):
    meta = json.loads((ours / "model.json").read_text())
    assert meta["model"] == LLAMA and meta["config"]["__dataclass__"] == "llava_jax.models.llama:LlamaConfig"
    assert isinstance(convert.load(ours), LlamaForCausalLM)
    assert isinstance(load_model(ours)[0], LlamaForCausalLM)


@pytest.mark.parametrize("case", sorted(HOSTILE_MODEL_JSON))
def test_hostile_model_json_is_refused_by_every_loader(case, ours, tmp_path, hostile, capsys):
    bad = tmp_path / "bad"
    with_model_json(ours, bad, HOSTILE_MODEL_JSON[case])
    with pytest.raises(convert.CheckpointError, match=r"model\.json"):
        convert.load(bad)
    with pytest.raises(ModelLoadError, match=r"model\.json"):
        load_model(bad)
    assert convert_main(["export", str(bad), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "model.json" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_training_workdir_pointing_at_a_hostile_folder_is_refused(ours, tmp_path, hostile):
    bad = tmp_path / "bad"
    with_model_json(ours, bad, HOSTILE_MODEL_JSON["model type"])
    (bad / "config.json").write_text("{}")  # what the workdir lookup checks for a finished export
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"export_hf": str(bad), "data": {"template": "v1"}}))
    with pytest.raises(ModelLoadError, match=r"model\.json"):
        load_model(workdir)
    (workdir / "config.json").write_text(json.dumps(["hostile_mod:Boom"]))
    with pytest.raises(ModelLoadError, match="training workdir without a finished"):
        load_model(workdir)
    (workdir / "config.json").write_text(json.dumps({"export_hf": {"__dataclass__": "hostile_mod:Boom"}}))
    with pytest.raises(ModelLoadError, match="must be strings"):
        load_model(workdir)


def hostile_tokenizer(src, dst):
    """A copy of a tokenizer folder whose config asks for custom code in the folder (`auto_map`)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    (dst / "hostile_tok.py").write_text("import hostile_mod\n")
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="HostileTokenizer",
                  auto_map={"AutoTokenizer": ["hostile_tok.HostileTokenizer", "hostile_tok.HostileTokenizer"]})
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def test_tokenizer_asking_for_custom_code_is_refused_without_a_prompt(ours, tmp_path, hostile):
    bad = tmp_path / "bad"
    shutil.copytree(ours, bad)
    hostile_tokenizer(ours, bad)
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(bad)
    with pytest.raises(ValueError, match="trust_remote_code"):
        convert.to_hf(convert.load(ours), tmp_path / "export", tokenizer=bad)
    assert not (tmp_path / "export").exists()


def test_hf_config_naming_custom_code_is_refused(tmp_path, hostile):
    path = tmp_path / "hf"
    helpers.save_tiny_llama(path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="hostile", architectures=["HostileForCausalLM"],
                  auto_map={"AutoConfig": "hostile_mod.Config", "AutoModelForCausalLM": "hostile_mod.Boom"})
    del config["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(convert.CheckpointError, match=r"config\.json"):
        convert.from_hf(path)
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(path)
    (path / "config.json").write_text(json.dumps(["hostile_mod.Boom"]))
    with pytest.raises(convert.CheckpointError, match=r"config\.json: expected a JSON object"):
        convert.from_hf(path)


def test_saving_refuses_types_outside_the_allow_lists(tmp_path):
    class Other(nnx.Module):
        def __init__(self):
            self.config = CLIPVisionConfig()

    with pytest.raises(TypeError, match="is not one of"):
        convert.save(Other(), tmp_path / "x")
    assert not (tmp_path / "x").exists()
