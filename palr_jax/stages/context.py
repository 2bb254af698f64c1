"""What the stages of one process share: the config, the workdir, the data, and each model loaded once.

Loading is lazy and cached, so a stage that is skipped costs nothing, and stages that run in the same
process share one copy of the base weights (fine-tuning on the global mesh; on one process the inference
stages use the same mesh, and so the same arrays; on several, switching meshes reloads). Adapters are
added to a model built on the shared weights, never to the weights themselves.
"""
from __future__ import annotations

import functools

from etils import epath
from flax import nnx

from palr_jax import rng
from palr_jax import sharding
from palr_jax.data import interactions
from palr_jax.data import profile_text
from palr_jax.hub import hf, load
from palr_jax.model import llama
from palr_jax.sharding import Placement


class Context:

  def __init__(self, config, workdir):
    self.config = config
    self.workdir = epath.Path(workdir)
    self.stage = ''        # set by the runner: the stage running, its fingerprint, and the output
    self.fingerprint = ''  # digests of its upstream stages ({stage: {output: digest}})
    self.upstream: dict[str, dict] = {}
    self._params: dict = {}

  # Data.

  @functools.cached_property
  def inter(self) -> interactions.Interactions:
    return interactions.load(self.config.data)

  @functools.cached_property
  def split(self) -> interactions.Split:
    return interactions.leave_one_out(self.inter)

  def profiles(self) -> list[str] | None:
    """Each user's profile (W/profiles.jsonl), or None when prompts do not show profiles."""
    if not self.config.prompts.use_profile:
      return None
    return profile_text.read_profiles(self.workdir / 'profiles.jsonl', self.inter)

  # The model.

  @functools.cached_property
  def hf_folder(self) -> epath.Path:
    return load.hf_folder(self.config.model)

  @functools.cached_property
  def tokenizer(self):
    return hf.load_tokenizer(self.hf_folder)

  @functools.cached_property
  def llama_config(self) -> llama.LlamaConfig:
    return hf.llama_config(self.hf_folder, self.config.model)

  @functools.cached_property
  def mesh(self):
    """The global mesh (every device of the job)."""
    return sharding.make_mesh(self.config.mesh)

  @functools.cached_property
  def local_mesh(self):
    """This process's devices (the same mesh as `mesh` on one process)."""
    return self.mesh if self.mesh.devices.size == len(self.mesh.local_devices) else (
        sharding.local_mesh(self.config.mesh))

  @property
  def placement(self) -> Placement:
    """Where inference batches go: the host-local mesh."""
    return Placement(self.local_mesh, self.config.mesh.rules)

  def base_model(self, mesh) -> llama.Llama:
    """The base model with its weights on `mesh`; one mesh's copy is kept (on a multi-process job, the
    global mesh's for training and the host-local mesh's for inference: never both in device memory)."""
    key = id(mesh)
    if key not in self._params:
      self._params.clear()
      self._params[key] = hf.load_params(self.hf_folder, self.llama_config, mesh, self.config.mesh.rules)
    return load.build(self.llama_config, self._params[key])

  def lora_model(self, mesh, lora_config, stream: str) -> llama.Llama:
    """The base model with fresh LoRA adapters, A drawn from the named random stream `stream`."""
    model = self.base_model(mesh)
    seed = int(self.config.seed)
    rngs = nnx.Rngs(params=rng.jax_key(seed, stream), dropout=rng.jax_key(seed, stream + '-dropout'))
    load.add_lora(model, lora_config, rngs, mesh, self.config.mesh.rules)
    return model

  def drop_models(self) -> None:
    """Frees the cached weights (before a stage that needs the memory)."""
    self._params.clear()
