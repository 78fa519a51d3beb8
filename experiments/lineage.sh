#!/bin/sh
# The lineage study: one network per idea from LeNet-5 to CoAtNet, and the k-NN floor, on
# CIFAR-10 at 32x32 (configs/lineage.py), then its report in results/lineage/. The CPU budget
# (150 steps of 128, 2 seeds) ran on one core of a 2-core EPYC; on an accelerator raise it,
# e.g. BUDGET=steps=20000,seeds=3
set -e
SCALING=${SCALING:-.venv/bin/scaling}
CIFAR=${CIFAR:?set CIFAR to CIFAR-10 as an image-folder tree or archive (train/CLASS/*.png, test/...)}
BUDGET=${BUDGET:-steps=150,batch_size=128,seeds=2}
$SCALING sweep --config "configs/lineage.py:dataset=folder:$CIFAR,$BUDGET" --workdir runs/lineage
$SCALING knn --data "folder:$CIFAR" --image-size 32 --k 1 5 10 --distance l2 --workdir runs/lineage/knn_l2
$SCALING report runs/lineage --out results/lineage --notes experiments/lineage.md
