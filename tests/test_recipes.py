"""The ImageNet recipes of every family (configs/imagenet.py), timm's LAMB in optax, RandFormer's
constraints in training, and a smoke run of each family through `python main.py`."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import optax
import pytest

from conftest import REPO, cpu_env, load_config
from poolformer_jax import defaults
from poolformer_jax import model as model_lib
from poolformer_jax import optimizer
from poolformer_jax import train

SMOKE = ("poolformerv2_s12", "identityformer_s12", "randformer_s12", "convformer_s18",
         "caformer_s18")


@pytest.mark.parametrize("arg,opt,lr,warmup,drop_path,head_dropout,crop,size", [
    ("s12", "adamw", 4e-3, 5, 0.1, 0.0, 0.9, 224),  # PoolFormer v1, as before
    ("poolformer_m48", "adamw", 4e-3, 5, 0.4, 0.0, 0.95, 224),
    ("identityformer_s12", "adamw", 4e-3, 5, 0.1, 0.0, 1.0, 224),
    ("randformer_m48", "adamw", 4e-3, 5, 0.3, 0.0, 1.0, 224),
    ("poolformerv2_m48", "adamw", 4e-3, 5, 0.4, 0.0, 1.0, 224),
    ("convformer_b36", "adamw", 4e-3, 20, 0.6, 0.0, 1.0, 224),
    ("caformer_s18", "lamb", 8e-3, 20, 0.15, 0.0, 1.0, 224),
    ("caformer_b36", "lamb", 8e-3, 20, 0.6, 0.5, 1.0, 224),
])
def test_recipe_of_each_family(arg, opt, lr, warmup, drop_path, head_dropout, crop, size):
  c = load_config(f"imagenet.py:{arg}")
  assert c.batch_size == 4096 and c.num_epochs == 300 and c.cooldown_epochs == 10
  assert c.optimizer == opt and c.warmup_epochs == warmup
  assert optimizer.peak_learning_rate(c) == pytest.approx(lr)
  model = model_lib.get_config(c.model, **c.model_overrides.to_dict())
  assert (model.drop_path_rate, model.head_dropout) == (drop_path, head_dropout)
  assert c.data.crop_pct is None  # the model's, filled in by the trainer:
  assert defaults.with_model_defaults(c).data.crop_pct == crop and c.data.image_size == size
  if opt == "lamb":  # timm's Lamb defaults: eps 1e-6, global grad norm clipped at 1
    assert c.adam_eps == 1e-6 and c.grad_clip_norm == 1.0
  else:
    assert c.adam_eps == 1e-8 and c.grad_clip_norm == 0.0
  train.validate_config(c, workdir=None, num_devices=8, process_count=1)


def test_the_readme_variant_table_is_the_registry_macs_and_released_top1():
  """The variants are written once, in model.VARIANTS: the README's table must agree with it
  (blocks, widths, mixers, eval crop), with benchmarks/results/macs_224.json (written by
  benchmarks/macs.py: parameters, GMACs) and with the released names' top-1 (hub.PRETRAINED)."""
  from poolformer_jax import hub
  readme = (REPO / "README.md").read_text()
  rows = re.findall(r"^\| `(\w+)` \| ([\d, ]+) \| ([\d, ]+) \| ([a-z, ]+) \| ([\d,]+) \| "
                    r"([\d.]+)G \| ([\d.]+) \| ([\d.]+) \|$", readme, re.M)
  macs = json.loads((REPO / "benchmarks" / "results" / "macs_224.json").read_text())["models"]
  assert sorted(r[0] for r in rows) == model_lib.list_models()
  short = {"attention": "attn", "identity": "id", "random": "rand", "pooling": "pool"}
  for name, depths, widths, mixers, params, gmacs, crop, top1 in rows:
    cfg = model_lib.VARIANTS[name]
    assert depths == ", ".join(map(str, cfg.depths)), name
    assert widths == ", ".join(map(str, cfg.widths)), name
    stage_mixers = [short.get(m, m) for m in cfg.stage_token_mixers]
    one_mixer = len(set(stage_mixers)) == 1  # written once
    assert mixers == (stage_mixers[0] if one_mixer else ", ".join(stage_mixers)), name
    assert int(params.replace(",", "")) == macs[name]["params"], name
    assert float(gmacs) == round(macs[name]["macs"] / 1e9, 1), name
    assert float(crop) == cfg.crop_pct, name
    assert float(top1) == hub.PRETRAINED[f"{name}.sail_in1k"].top1, name


@pytest.mark.parametrize("arg", ["caformer", "caformer_s18,fast", "s99"])
def test_unknown_config_args_are_refused(arg):
  with pytest.raises(ValueError, match="MODEL or MODEL,smoke"):
    load_config(f"imagenet.py:{arg}")


def test_randformer_needs_224_and_optimizer_names_are_checked():
  c = load_config("imagenet.py:randformer_s12")
  c.data.image_size = 256
  with pytest.raises(train.ConfigError, match=r"image_size=256.*--config.data.image_size=224"):
    train.validate_config(c, workdir=None, num_devices=8, process_count=1)
  c = load_config("imagenet.py:convformer_s18")
  c.optimizer = "sgd"
  with pytest.raises(train.ConfigError, match=r"config.optimizer='sgd'; use one of"):
    train.validate_config(c, workdir=None, num_devices=8, process_count=1)


def test_lamb_matches_timms_lamb():
  """Three steps of the CAFormer recipe's optimizer (clip + our LAMB) against timm's Lamb with
  the release's parameter groups (weight decay on weights only), on gradients whose global
  norm is above 1 (so the clip acts) and below it."""
  torch = pytest.importorskip("torch")
  import helpers_torch as H
  H.import_timm()
  from timm.optim import Lamb

  c = load_config("imagenet.py:caformer_s18")
  tx = optimizer.make_optimizer(c, optax.constant_schedule(c.base_lr))
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(8, 4)).astype(np.float32),
            "conv": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
            "b": rng.normal(size=(8,)).astype(np.float32),
            "scale": rng.normal(1.0, 0.2, size=(4,)).astype(np.float32)}
  grads = [{k: (g * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
           for g in (3.0, 0.1, 1.0)]
  torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
  decay = [torch_params[k] for k in params if params[k].ndim > 1]
  no_decay = [torch_params[k] for k in params if params[k].ndim <= 1]
  ref = Lamb([{"params": decay, "weight_decay": c.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}], lr=c.base_lr, eps=c.adam_eps,
             betas=(c.adam_b1, c.adam_b2))
  state = tx.init(params)
  ours = params
  for g in grads:
    updates, state = tx.update(g, state, ours)
    ours = optax.apply_updates(ours, updates)
    for k, p in torch_params.items():
      p.grad = torch.from_numpy(g[k])
    ref.step()
  for k, p in torch_params.items():
    moved = np.abs(p.detach().numpy() - params[k]).max()
    assert moved > 1e-3, k
    np.testing.assert_allclose(ours[k], p.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=k)
  # optax.lamb would differ: it applies the trust ratio to the 1-D tensors too.
  plain = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.lamb(c.base_lr, eps=c.adam_eps, weight_decay=c.weight_decay,
                                 mask=optimizer.decay_mask))
  state, other = plain.init(params), params
  for g in grads:
    updates, state = plain.update(g, state, other)
    other = optax.apply_updates(other, updates)
  assert np.abs(other["b"] - torch_params["b"].detach().numpy()).max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("model", SMOKE)
def test_smoke_run_of_each_family_through_main(model, digits_data_dir, tmp_path):
  """`python main.py --config=configs/imagenet.py:MODEL,smoke`: the family's recipe (its
  optimizer, drop path, head dropout) on a tiny version of its architecture, a few steps on
  digits; it ends with a finite loss and a checkpoint."""
  env = cpu_env(1)
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, str(REPO / "main.py"), f"--config=configs/imagenet.py:{model},smoke",
       f"--workdir={workdir}", f"--config.data.data_dir={digits_data_dir}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"done: {workdir} step 4, eval/top1" in proc.stdout
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f if line.strip()]
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  assert os.path.isdir(workdir / "checkpoints" / "4")
  written = json.loads((workdir / "train_config.json").read_text())
  assert written["model"] == model and written["model_overrides"]["depths"] == [1, 1, 1, 1]
  assert written["optimizer"] == ("lamb" if model.startswith("caformer") else "adamw")
