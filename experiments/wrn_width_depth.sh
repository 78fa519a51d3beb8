#!/bin/sh
# Study 1, WRN width vs depth on CIFAR-10, then its report in results/wrn_width_depth/.
# The CPU budget (16x16 images, 400 steps of 64, 2 seeds) took 29-38 minutes on 2 cores;
# on an accelerator raise it, e.g. BUDGET=image_size=32,steps=39000,batch_size=128,seeds=3.
set -e
SCALING=${SCALING:-.venv/bin/scaling}
CIFAR=${CIFAR:?set CIFAR to CIFAR-10 as an image-folder tree or archive (train/CLASS/*.png, test/...)}
BUDGET=${BUDGET:-image_size=16,steps=400,batch_size=64,seeds=2}
$SCALING sweep --config "configs/wrn_width_depth.py:dataset=folder:$CIFAR,$BUDGET" \
  --workdir runs/wrn_width_depth
$SCALING report runs/wrn_width_depth --out results/wrn_width_depth \
  --notes experiments/wrn_width_depth.md
