"""The CPU optimisations keep results: same programs, same losses, only faster."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from conftest import run_python
from jax import lax

from scaling import CPU_CONVOLUTION_FLAG


def ynn_convolutions(compiled_text):
    """How many of a compiled CPU program's YNNPACK fusions hold a convolution."""
    called = re.findall(r"calls=%([\w.-]+)[^\n]*__ynn_fusion", compiled_text)
    bodies = dict(re.findall(r"^%([\w.-]+) .*?\{\n(.*?)\n\}", compiled_text, re.S | re.M))
    return sum(" convolution(" in bodies[name] for name in called)


def conv_gradient_program():
    """The compiled CPU program of a convolution's weight gradient."""

    def loss(kernel, x):
        dims = ("NHWC", "HWIO", "NHWC")
        return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dims).sum()

    args = jnp.ones((3, 3, 8, 8)), jnp.ones((32, 16, 16, 8))
    return jax.jit(jax.grad(loss)).lower(*args).compile().as_text()


def test_convolutions_stay_with_xla_on_cpu():
    assert f"{CPU_CONVOLUTION_FLAG}=-individual_convolution" in os.environ["XLA_FLAGS"]
    text = conv_gradient_program()
    assert " convolution(" in text and ynn_convolutions(text) == 0


def test_cpu_convolution_flag_keeps_the_loss_curve():
    code = """
import json, tempfile
from scaling.config import load_config
from scaling.train import read_metrics, train
config = load_config('configs/train.py:model=resnet8,image_size=16,steps=12,batch_size=64,lr=0.01')
config.log_every = 1
with tempfile.TemporaryDirectory() as d:
    train(config, d)
    losses = [r['loss'] for r in read_metrics(d + '/metrics.jsonl') if 'loss' in r]
import sys; sys.path.insert(0, 'tests')
from test_performance import conv_gradient_program, ynn_convolutions
print(json.dumps([ynn_convolutions(conv_gradient_program()), losses]))
"""
    ynn, ours = json.loads(run_python(code).splitlines()[-1])
    # XLA's default, YNNPACK convolutions, by the user's own setting of the flag.
    flag = f"{CPU_CONVOLUTION_FLAG}=+individual_convolution"
    default_ynn, default = json.loads(run_python(code, xla_flags=flag).splitlines()[-1])
    assert ynn == 0 and default_ynn > 0 and len(ours) == 12
    # Another library sums each convolution in another order: the same bound as sharding gets
    # in test_train.test_one_device_equals_eight_devices.
    np.testing.assert_allclose(ours[:5], default[:5], rtol=1e-5)
    np.testing.assert_allclose(ours, default, rtol=5e-4)
