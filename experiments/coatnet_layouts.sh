#!/bin/sh
# Study 3, CoAtNet stage layouts at matched parameters on CIFAR-10: generalization gap on a
# small subset against fitting capacity on the full set, then its report in
# results/coatnet_layouts/. The CPU budget (32x32, ~0.7M parameters, 300 steps of 64, 2 seeds)
# took 26-44 minutes on 2 cores (VIT_REL did not fit); on an accelerator raise it, e.g.
# BUDGET=steps=20000,batch_size=128,params=25000000,depths=2+2+3+5+2,small_subset=5000,seeds=3,vit_rel=True
set -e
SCALING=${SCALING:-.venv/bin/scaling}
CIFAR=${CIFAR:?set CIFAR to CIFAR-10 as an image-folder tree or archive (train/CLASS/*.png, test/...)}
BUDGET=${BUDGET:-steps=300,batch_size=64,params=700000,depths=1+1+2+3+1,small_subset=1000,seeds=2}
$SCALING sweep --config "configs/coatnet_layouts.py:dataset=folder:$CIFAR,image_size=32,$BUDGET" \
  --workdir runs/coatnet_layouts
$SCALING report runs/coatnet_layouts --out results/coatnet_layouts \
  --notes experiments/coatnet_layouts.md
