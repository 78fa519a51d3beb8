#!/bin/sh
# The regularisation study: ResNet-20 with none, dropout, label smoothing, mixup, CutMix or early
# stopping, over nested CIFAR-10 subsets (configs/regularisation.py), then its report in
# results/regularisation/. The CPU budget (200 steps of 64, subsets of 500 to 8,000, 2 seeds)
# ran on one core of a 2-core EPYC; on an accelerator raise it,
# e.g. BUDGET=steps=5000,batch_size=128,sizes=2500+10000+50000,seeds=3
set -e
SCALING=${SCALING:-.venv/bin/scaling}
CIFAR=${CIFAR:?set CIFAR to CIFAR-10 as an image-folder tree or archive (train/CLASS/*.png, test/...)}
BUDGET=${BUDGET:-steps=200,batch_size=64,sizes=500+2000+8000,seeds=2}
$SCALING sweep --config "configs/regularisation.py:dataset=folder:$CIFAR,$BUDGET" \
  --workdir runs/regularisation
$SCALING report runs/regularisation --out results/regularisation \
  --notes experiments/regularisation.md
