#!/bin/sh
# The scaling-strategies study: WRN-16-1 grown by depth, width, resolution, compound and dWr
# scaling to 2x, 3x and 4x its FLOPs (2 seeds), and 30 trials sampled from the WRN design space
# inside 1-2x (configs/scaling_strategies.py), on CIFAR-10 at 32x32; then its report, with the
# 4x networks held out of the scaling laws and predicted, in results/scaling_strategies/.
# The CPU budget (150 steps of 128) ran two trials at a time on a 2-core EPYC in ~85 min; on an
# accelerator raise it, e.g. BUDGET=steps=20000,budgets=2+4+8+16
set -e
SCALING=${SCALING:-.venv/bin/scaling}
CIFAR=${CIFAR:?set CIFAR to CIFAR-10 as an image-folder tree or archive (train/CLASS/*.png, test/...)}
BUDGET=${BUDGET:-steps=150,batch_size=128,seeds=2}
OMP_NUM_THREADS=1 $SCALING sweep --config "configs/scaling_strategies.py:dataset=folder:$CIFAR,$BUDGET" \
    --workdir runs/strategies --parallel 2
$SCALING report runs/strategies --out results/scaling_strategies --extrapolate 5 \
    --notes experiments/scaling_strategies.md
