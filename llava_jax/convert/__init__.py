"""Hugging Face import and export.

Import (weights stream tensor by tensor into an abstractly created model; bfloat16 stays bfloat16 unless a
dtype is given):
- `from_hf(path)`: a Hugging Face LLaVA folder (every on-disk layout), a LLaMA-family causal LM folder, a
  CLIP folder (vision tower), or an original LLaVA folder.
- `from_clip_and_llm(clip_path, llm_path)`: LLaVA from a CLIP tower + an LLM, with a fresh projector.
- `from_original_llava(path, clip_path=None)`: the official `model.mm_projector.*` layout.

Export: `to_hf(model, path, tokenizer=None)` writes a folder that transformers' `from_pretrained` and
`AutoProcessor.from_pretrained` load. `load_folder(path)` reads ours or a Hugging Face folder;
`resolve_workdir(path)` turns a finished training workdir into its export folder (as chat and serve do).
Our own format: `save(model, dir)` / `load(dir)` (Orbax + JSON; the types `model.json` may name are an
allow-list, nothing it names is imported). Exports and saves are written to a temporary sibling folder and
renamed into place (`llava_jax.atomic_files`).

dtypes: `param_dtype` is the storage dtype (default: the checkpoint's), `dtype` the compute dtype
(default: `param_dtype`); `from_hf(path, dtype=jnp.float32)` also stores float32 when `param_dtype` is None.
Sharding: every importer and `load` take `mesh=`; each parameter then goes straight into its sharding
(logical axis rules of `llava_jax.sharding`) as it is read.

Files: `families.py` (one row per model family: model and config classes, config and tensor names both
ways, the preprocessing files of an export; import, export and our format read it), `hf_<family>.py` (what
a row points at) and `hf_original.py` (the official LLaVA layout), `importers.py` (one importer per source),
`export.py` (to Hugging Face: model -> named tensors, config, preprocessing), `native.py` (our own format),
`folders.py` (what a model path is: ours, Hugging Face, or a training workdir standing for its export),
`checkpoint_io.py` (reading and writing checkpoint files), `build.py` (the import side: filling an abstract
model leaf by leaf), `params.py` (parameter names).
"""

from llava_jax.convert.checkpoint_io import CheckpointError, CheckpointReader
from llava_jax.convert.folders import FolderError, load_folder, resolve_workdir
from llava_jax.convert.export import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN, add_image_token, to_hf
from llava_jax.convert.importers import from_clip_and_llm, from_hf, from_original_llava
from llava_jax.convert.native import load, save

__all__ = ["from_hf", "from_clip_and_llm", "from_original_llava", "to_hf", "save", "load", "add_image_token",
           "CheckpointError", "CheckpointReader", "IMAGE_TOKEN", "CLIP_MEAN", "CLIP_STD", "FolderError",
           "load_folder", "resolve_workdir"]
