"""Released checkpoints by name, as timm users get them: listed, downloaded, converted once, cached.

  create_model("caformer_s18.sail_in1k_384", pretrained=True)
  load_pretrained("hf-hub:timm/caformer_s18.sail_in1k_384")  # the same checkpoint
  load_pretrained("hf-hub:sail/poolformer_s12")              # transformers' PoolFormer repos
  list_pretrained("caformer_s18*")

Names are timm's `<model>.<tag>`: timm's 50 for this family, plus the release's IdentityFormer
and RandFormer (10), which exist only as .pth files in the release's own hub repo (`sail/dl`)
and are named after timm's convention. A model name without a tag means its `sail_in1k` weights,
as in timm.

On first use the source files are downloaded with huggingface_hub (its cache; HF_ENDPOINT and
HF_HUB_OFFLINE are read at each call), checked (a file whose hub ETag is a SHA-256 must hash to
it), converted by poolformer_jax.convert (every tensor checked) and saved as a pretrained
directory (poolformer_jax.pretrained) in $POOLFORMER_JAX_CACHE/<name>/ (default
~/.cache/poolformer_jax). Later calls load that directory: no network, no conversion. An entry
is built under a file lock and renamed into place when complete, so a killed download or
conversion leaves nothing under its name, and processes sharing a cache build it once. Loading
verifies every array's fingerprint; a damaged entry is rebuilt, not loaded. To fetch a newer
upload of a checkpoint, delete its entry.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import importlib.util
import os
import re
import shutil
import sys

from absl import logging
import jax
import jax.numpy as jnp
from flax import nnx

from poolformer_jax import model as model_lib
from poolformer_jax import pretrained as pretrained_lib
from poolformer_jax.errors import CheckpointError, ConfigError, DownloadError
from poolformer_jax.model import MetaFormer, MetaFormerConfig
from poolformer_jax.pretrained import PretrainedInfo

HUB_PREFIX = "hf-hub:"
RELEASE_REPO = "sail/dl"  # The MetaFormer-baselines release's repo: <family>/<model>.pth.
DEFAULT_TAG = "sail_in1k"  # timm's default tag for every model of this family.


@dataclasses.dataclass(frozen=True)
class PretrainedTag:
  """One released checkpoint and how the release evaluated it."""

  name: str  # timm's '<model>.<tag>', e.g. 'caformer_s18.sail_in1k_384'
  model: str  # the architecture, a name of `list_models()`
  input_size: int  # eval resolution (square)
  crop_pct: float  # eval center crop: the short side is resized to input_size / crop_pct
  num_classes: int  # 1000 (ImageNet-1k), or 21841 for the ImageNet-21k heads
  top1: float | None  # the release's ImageNet-1k top-1 at input_size; None for a 21k head
  repo: str  # the HF-hub repo holding it
  filename: str | None = None  # the file in `repo` (a release .pth); None: a model directory

  @property
  def url(self) -> str:
    page = f"https://huggingface.co/{self.repo}"
    return f"{page}/resolve/main/{self.filename}" if self.filename else page


# The releases' ImageNet-1k top-1 (the sail-sg/poolformer and sail-sg/metaformer READMEs).
_V1_TOP1 = {"s12": 77.2, "s24": 80.3, "s36": 81.4, "m36": 82.1, "m48": 82.5}
_IN1K_ONLY_TOP1 = {  # 224 ImageNet-1k weights only.
    "poolformerv2": {"s12": 78.0, "s24": 80.7, "s36": 81.6, "m36": 82.2, "m48": 82.6},
    "identityformer": {"s12": 74.6, "s24": 78.2, "s36": 79.3, "m36": 80.0, "m48": 80.4},
    "randformer": {"s12": 76.6, "s24": 78.2, "s36": 79.5, "m36": 81.2, "m48": 81.4},
}
# ConvFormer and CAFormer: top-1 of (sail_in1k, sail_in1k_384, sail_in22k_ft_in1k,
# sail_in22k_ft_in1k_384); each also has sail_in22k, its ImageNet-21k head.
_CONV_CA_TOP1 = {
    "convformer_s18": (83.0, 84.4, 83.7, 85.0), "convformer_s36": (84.1, 85.4, 85.4, 86.4),
    "convformer_m36": (84.5, 85.6, 86.1, 86.9), "convformer_b36": (84.8, 85.7, 87.0, 87.6),
    "caformer_s18": (83.6, 85.0, 84.1, 85.4), "caformer_s36": (84.5, 85.7, 85.8, 86.9),
    "caformer_m36": (85.2, 86.2, 86.6, 87.5), "caformer_b36": (85.5, 86.4, 87.4, 88.1),
}
_CONV_CA_TAGS = ("sail_in1k", "sail_in1k_384", "sail_in22k_ft_in1k", "sail_in22k_ft_in1k_384")


def _table() -> dict[str, PretrainedTag]:
  tags = []
  for size, top1 in _V1_TOP1.items():
    model = f"poolformer_{size}"
    tags.append(PretrainedTag(f"{model}.{DEFAULT_TAG}", model, 224,
                              model_lib.VARIANTS[model].crop_pct, 1000, top1,
                              f"timm/{model}.{DEFAULT_TAG}"))
  for family, top1s in _IN1K_ONLY_TOP1.items():
    for size, top1 in top1s.items():
      model = f"{family}_{size}"
      name = f"{model}.{DEFAULT_TAG}"
      in_timm = family == "poolformerv2"
      tags.append(PretrainedTag(name, model, 224, 1.0, 1000, top1,
                                f"timm/{name}" if in_timm else RELEASE_REPO,
                                None if in_timm else f"{family}/{model}.pth"))
  for model, top1s in _CONV_CA_TOP1.items():
    for tag, top1 in zip(_CONV_CA_TAGS, top1s):
      tags.append(PretrainedTag(f"{model}.{tag}", model, 384 if tag.endswith("384") else 224,
                                1.0, 1000, top1, f"timm/{model}.{tag}"))
    tags.append(PretrainedTag(f"{model}.sail_in22k", model, 224, 1.0, 21841, None,
                              f"timm/{model}.sail_in22k"))
  return {t.name: t for t in tags}


PRETRAINED: dict[str, PretrainedTag] = _table()


def list_pretrained(pattern: str = "*") -> list[PretrainedTag]:
  """The released checkpoints whose name matches `pattern` (fnmatch, as timm's), e.g.
  `[t.name for t in list_pretrained("caformer_s18*")]`."""
  return [t for t in PRETRAINED.values() if fnmatch.fnmatchcase(t.name, pattern)]


# ---------------------------------------------------------------------------
# Names -> cache entries.
# ---------------------------------------------------------------------------


def cache_dir() -> str:
  """$POOLFORMER_JAX_CACHE, default ~/.cache/poolformer_jax (read at each call)."""
  return os.path.abspath(os.path.expanduser(
      os.environ.get("POOLFORMER_JAX_CACHE") or os.path.join("~", ".cache", "poolformer_jax")))


@dataclasses.dataclass(frozen=True)
class _Source:
  """What to download for a name: a released tag, or any hf-hub model directory."""

  key: str  # the cache entry's directory name
  repo: str
  filename: str | None = None
  tag: PretrainedTag | None = None

  @property
  def entry(self) -> str:
    return os.path.join(cache_dir(), self.key)

  @property
  def url(self) -> str:
    return self.tag.url if self.tag else f"https://huggingface.co/{self.repo}"


def _closest(name: str) -> str:
  candidates = list(PRETRAINED) + model_lib.list_models()
  close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
  return (f"closest: {', '.join(close)}" if close else
          "see poolformer_jax.list_pretrained() for every released name")


def find_tag(name: str) -> PretrainedTag:
  """The released checkpoint `name` ('caformer_s18.sail_in1k_384', or a bare model name for its
  sail_in1k weights); a ConfigError naming the closest names otherwise."""
  if name in PRETRAINED:
    return PRETRAINED[name]
  if f"{name}.{DEFAULT_TAG}" in PRETRAINED:
    return PRETRAINED[f"{name}.{DEFAULT_TAG}"]
  raise ConfigError(f"no released checkpoint (nor a directory) is named {name!r}; "
                    f"{_closest(name)}")


def _source(name: str) -> _Source:
  if name.startswith(HUB_PREFIX):
    repo = name[len(HUB_PREFIX):].strip("/")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
      raise ConfigError(f"{name!r}: expected hf-hub:ORGANISATION/REPOSITORY, e.g. "
                        "hf-hub:timm/caformer_s18.sail_in1k or hf-hub:sail/poolformer_s12")
    org, _, tag_name = repo.partition("/")
    if org == "timm" and tag_name in PRETRAINED:  # The same entry as the name itself.
      return _source(tag_name)
    return _Source(key=f"hf-hub--{repo.replace('/', '--')}", repo=repo)
  tag = find_tag(name)
  return _Source(key=tag.name, repo=tag.repo, filename=tag.filename, tag=tag)


def _is_local(source: str) -> bool:
  """A directory (or gs:// path) rather than a name: what exists, or what looks like a path."""
  return ("://" in source or os.path.exists(source) or source.startswith((".", "~"))
          or os.sep in source and not source.startswith(HUB_PREFIX))


def resolve(source: str | os.PathLike) -> str:
  """The directory to load for `source`: a local directory or workdir (or gs://) as given; a
  released name or an `hf-hub:` repo as its cache entry, downloaded and converted if missing."""
  source = os.fspath(source)
  if _is_local(source):
    return source
  return _ensure(_source(source))


def read_info(source: str | os.PathLike) -> tuple[PretrainedInfo, MetaFormerConfig]:
  """`pretrained_lib.read_info` of what `source` resolves to (no weights are restored)."""
  return pretrained_lib.read_info(resolve(source))


def load_params(source: str | os.PathLike) -> tuple[dict, PretrainedInfo, MetaFormerConfig]:
  """`pretrained_lib.load_params` of a directory, a workdir, a released name or an hf-hub repo.

  A cache entry that fails verification (a damaged file, altered bytes) is rebuilt once.
  """
  source = os.fspath(source)
  if _is_local(source):
    return pretrained_lib.load_params(source)
  src = _source(source)
  entry = _ensure(src)
  try:
    return pretrained_lib.load_params(entry)
  except CheckpointError as e:
    logging.warning("The cache entry %s is damaged (%s); rebuilding it", entry, e)
    _build(src, replace=True)
    return pretrained_lib.load_params(entry)


def load_pretrained(source: str | os.PathLike, *, dtype=jnp.float32,
                    rngs: nnx.Rngs | None = None) -> tuple[MetaFormer, PretrainedInfo]:
  """A ready model (float32 params, `dtype` compute) and its info (labels, eval preprocessing).

  `source`: a converted model / `save_pretrained` directory, a training workdir (its newest
  verified checkpoint), a released name ('caformer_s18.sail_in1k_384', see `list_pretrained`)
  or an HF-hub repo ('hf-hub:timm/caformer_s18.sail_in1k_384', 'hf-hub:sail/poolformer_s12').
  `rngs` only seeds variables that are not in the checkpoint (none for the released models).
  """
  params, info, cfg = load_params(source)
  return pretrained_lib.build_model(params, cfg, dtype=dtype, rngs=rngs), info


def create_model(name: str, pretrained: bool = False, *, num_classes: int | None = None,
                 rngs: nnx.Rngs | None = None, dtype=jnp.float32, features_only: bool = False,
                 remat: bool = False, **overrides) -> MetaFormer:
  """timm's `create_model`: a model by name, randomly initialised or with released weights.

  `name` is an architecture ('caformer_s18', see `list_models`) or a released checkpoint
  ('caformer_s18.sail_in1k_384', 'hf-hub:...'); `pretrained=True` loads its weights (a bare
  architecture: its sail_in1k weights). A `num_classes` other than the checkpoint's gives a new
  head drawn from `rngs` (every other tensor loaded), as for fine-tuning. `overrides` replace
  config fields: with weights, only those that leave the architecture as it is (e.g.
  `drop_path_rate`). A random model needs `rngs`.
  """
  build = dict(dtype=dtype, features_only=features_only, remat=remat)
  if not pretrained:
    if rngs is None:
      raise ValueError("create_model needs rngs=nnx.Rngs(seed) to initialise a model (or "
                       "pretrained=True for released weights)")
    if name.startswith(HUB_PREFIX):
      raise ValueError(f"{name} names weights: pass pretrained=True")
    arch = find_tag(name).model if "." in name else name  # A tag names its architecture too.
    return model_lib.create_model(arch, num_classes=num_classes or 1000, rngs=rngs, **build,
                                  **overrides)
  params, info, cfg = load_params(name)
  new_cfg = dataclasses.replace(cfg, **overrides, num_classes=num_classes or cfg.num_classes)
  changed = [f for f in model_lib.ARCHITECTURE_FIELDS if getattr(new_cfg, f) != getattr(cfg, f)]
  if changed:
    raise ConfigError(f"{name}'s weights fix {', '.join(changed)}: with pretrained=True only "
                      "fields that keep the architecture (e.g. drop_path_rate) can be changed")
  if new_cfg.num_classes == cfg.num_classes or features_only:
    return pretrained_lib.build_model(params, new_cfg, rngs=rngs, **build)
  model = MetaFormer(new_cfg, rngs=rngs if rngs is not None else nnx.Rngs(0), **build)
  state = nnx.state(model, nnx.Param)
  merged = nnx.to_pure_dict(state)
  merged.update({k: jax.tree.map(jnp.asarray, v) for k, v in params.items() if k != "head"})
  nnx.replace_by_pure_dict(state, merged)
  nnx.update(model, state)
  logging.info("%s has %d classes, this model %d: the head is new, every other tensor loaded",
               name, info.num_classes, new_cfg.num_classes)
  return model


# ---------------------------------------------------------------------------
# Download, convert, cache.
# ---------------------------------------------------------------------------


def _offline() -> bool:
  """HF_HUB_OFFLINE as huggingface_hub reads it, but at this call, not at its import."""
  return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _missing_offline(src: _Source, why: str) -> DownloadError:
  how = (f"download {src.url} on a machine with network and convert it into the cache with "
         f"`python convert_torch_weights.py DOWNLOADED {src.entry}`, or copy {src.entry} from "
         "a machine that has it")
  return DownloadError(f"{src.key} is not in the cache ({src.entry}) and {why}: {how}")


class _NotOnHub(DownloadError):
  """The hub answered that the repo or file does not exist."""


def _fetch(src: _Source, filename: str) -> str:
  """One file of `src.repo` through huggingface_hub's cache; every failure a DownloadError."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors as hf_errors  # pylint: disable=g-import-not-at-top
  endpoint = os.environ.get("HF_ENDPOINT") or None
  for attempt in range(2):
    try:
      path = huggingface_hub.hf_hub_download(src.repo, filename, endpoint=endpoint,
                                             local_files_only=_offline(),
                                             force_download=attempt > 0)
    except (hf_errors.RepositoryNotFoundError, hf_errors.RemoteEntryNotFoundError,
            hf_errors.RevisionNotFoundError) as e:
      raise _NotOnHub(f"the hub ({endpoint or 'huggingface.co'}) has no {src.repo}/{filename} "
                      f"({type(e).__name__}); check the name") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as e:
      why = ("HF_HUB_OFFLINE is set" if _offline() or isinstance(e, hf_errors.OfflineModeIsEnabled)
             else f"the hub ({endpoint or 'huggingface.co'}) cannot be reached")
      raise _missing_offline(src, why) from None
    except (hf_errors.HfHubHTTPError, OSError, *_transport_errors()) as e:
      raise DownloadError(f"downloading {src.repo}/{filename} failed ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}); run the "
                          "same call again") from None
    if _sha256_matches(path):
      return path
    logging.warning("%s/%s does not hash to its hub checksum; downloading it again",
                    src.repo, filename)
  raise DownloadError(f"{src.repo}/{filename} was downloaded twice and does not match its hub "
                      f"checksum either time; delete {os.path.realpath(path)} and retry")


def _transport_errors() -> tuple[type[Exception], ...]:
  """The errors of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx before): a
  connection that drops mid-file after its retries. Neither is an OSError."""
  return tuple(m.HTTPError for m in map(sys.modules.get, ("httpx2", "httpx")) if m is not None)


def _sha256_matches(path: str) -> bool:
  """huggingface_hub stores a file under its ETag, which for LFS files (weights) is the
  SHA-256 of the content: check it. Other files (small JSON, git-hashed) pass."""
  blob = os.path.realpath(path)
  etag = os.path.basename(blob)
  if not re.fullmatch(r"[0-9a-f]{64}", etag):
    return True
  digest = hashlib.sha256()
  with open(blob, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest() == etag


def _require_torch(src: _Source, what: str) -> None:
  if importlib.util.find_spec("torch") is None:
    raise ConfigError(f"{src.key} is released as {what}, a PyTorch pickle, and reading it needs "
                      "torch: pip install -r requirements-torch.txt (the CPU build)")


def download(name: str) -> str:
  """The local path of `name`'s source (a .pth file, or a model directory of config.json and
  weights), fetched through huggingface_hub's cache."""
  return _download(_source(name))


def _download(src: _Source) -> str:
  if src.filename:
    _require_torch(src, src.filename)  # The release's files are all .pth pickles.
    return _fetch(src, src.filename)
  folder = os.path.dirname(_fetch(src, "config.json"))
  if src.tag is None:  # transformers' repos keep the eval transform beside the model config.
    try:
      _fetch(src, "preprocessor_config.json")
    except _NotOnHub:
      pass
  try:
    _fetch(src, "model.safetensors")
  except _NotOnHub:  # Older repos have only the pickled weights.
    _require_torch(src, "pytorch_model.bin")
    _fetch(src, "pytorch_model.bin")
  return folder


def _ensure(src: _Source) -> str:
  """The cache entry of `src`, built if it is not there."""
  if os.path.isfile(os.path.join(src.entry, pretrained_lib.CONFIG_FILE)):
    return src.entry
  return _build(src, replace=False)


def _build(src: _Source, *, replace: bool) -> str:
  """Downloads and converts `src` into its cache entry, under a lock: a process that waited for
  another's build takes the result. `replace` overwrites a damaged entry."""
  import filelock  # pylint: disable=g-import-not-at-top  (huggingface_hub's own dependency)
  from poolformer_jax import convert  # pylint: disable=g-import-not-at-top
  os.makedirs(cache_dir(), exist_ok=True)
  entry = src.entry
  with filelock.FileLock(os.path.join(cache_dir(), f".{src.key}.lock")):
    if not replace and os.path.isfile(os.path.join(entry, pretrained_lib.CONFIG_FILE)):
      return entry  # Built by another process meanwhile.
    for stale in os.listdir(cache_dir()):  # Left by a killed build of this entry.
      if stale.startswith(f".{src.key}.tmp-") or stale.startswith(f".{src.key}.old-"):
        shutil.rmtree(os.path.join(cache_dir(), stale), ignore_errors=True)
    logging.info("Downloading %s from %s", src.key, src.url)
    path = _download(src)
    logging.info("Converting %s", path)
    converted = convert.convert(path, model=src.tag.model if src.tag else None)
    info = converted.info
    preprocessing = dict(info.preprocessing)
    if src.tag is not None:
      tag = src.tag
      if (info.variant, info.num_classes) != (tag.model, tag.num_classes):
        raise DownloadError(f"{path} holds a {info.variant} with {info.num_classes} classes, "
                            f"not {tag.name}'s {tag.model} with {tag.num_classes}; delete it "
                            "and retry")
      preprocessing.update(input_size=tag.input_size, crop_pct=tag.crop_pct)
    pretrained_lib.save_pretrained(entry, converted.model, variant=info.variant, labels=info.labels,
                               preprocessing=preprocessing, overwrite=True)
    logging.info("Cached %s in %s", src.key, entry)
  return entry


