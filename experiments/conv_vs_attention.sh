#!/bin/sh
# Study 2, conv vs attention data efficiency on nested CIFAR-10 subsets, then its report in
# results/conv_vs_attention/. The CPU budget (32x32, ~0.7M-parameter models, 300 steps of 64,
# 4 subset sizes, 2 seeds) took 34 minutes on an idle 2-core EPYC (67 on a shared Xeon);
# on an accelerator raise it,
# e.g. BUDGET=steps=20000,batch_size=128,sizes=2500+5000+10000+25000+50000,params=1200000,seeds=3
set -e
SCALING=${SCALING:-.venv/bin/scaling}
CIFAR=${CIFAR:?set CIFAR to CIFAR-10 as an image-folder tree or archive (train/CLASS/*.png, test/...)}
BUDGET=${BUDGET:-steps=300,batch_size=64,sizes=500+1000+2000+5000,params=700000,coatnet_depths=1+1+2+3+1,seeds=2}
$SCALING sweep --config "configs/conv_vs_attention.py:dataset=folder:$CIFAR,image_size=32,$BUDGET" \
  --workdir runs/conv_vs_attention
$SCALING report runs/conv_vs_attention --out results/conv_vs_attention \
  --notes experiments/conv_vs_attention.md
