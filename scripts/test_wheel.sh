#!/usr/bin/env bash
# A wheel of the package (portable build: every CPU kernel at the baseline, AVX2 and AVX-512 levels,
# chosen at load time), installed into a clean virtualenv next to the same torch, passes a smoke test
# there: import, the level report, each op on the cpu backend against the reference.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck disable=SC1091
. .venv/bin/activate
TORCH_SPEC="torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
rm -rf dist && mkdir -p dist
echo "== pip wheel --no-build-isolation . =="
VLM_KERNELS_CUDA=${VLM_KERNELS_CUDA:-0} MAX_JOBS=${MAX_JOBS:-2} python -m pip wheel -q --no-build-isolation --no-deps . -w dist
deactivate
echo "== clean venv: $TORCH_SPEC + the wheel =="
rm -rf .venv-wheel && python3 -m venv .venv-wheel
.venv-wheel/bin/python -m pip install -q "$TORCH_SPEC" numpy dist/vlm_kernels-*.whl
cd /tmp  # not the source tree: the installed package must be the one imported
"$ROOT/.venv-wheel/bin/python" - <<'PY'
import torch, vlm_kernels as vk
from vlm_kernels import _backend
assert "site-packages" in vk.__file__, vk.__file__
print(vk.info())
isa = _backend.cpu_isa()
assert isa and isa["compiled"].split(",")[0] == "baseline" and not isa["error"], isa
g = torch.Generator().manual_seed(0)
x = torch.randn(4, 33, 6, generator=g)
r = torch.randn(100, 16, generator=g); e = torch.randn(40, 16, generator=g)
qkv = torch.randn(1, 7, 9, 72, generator=g); t = torch.randn(169, 3, generator=g)  # C=24: 3 heads of 8
calls = {
    "gumbel_softmax": lambda: vk.gumbel_softmax(x, tau=0.5, dim=1, seed=3),
    "gumbel_argmax": lambda: vk.gumbel_argmax(x, dim=1, seed=3),
    "categorical_kl_uniform": lambda: vk.categorical_kl_uniform(x, dim=1),
    "vq_nearest": lambda: vk.vq_nearest(r, e)[0],
    "window_attention": lambda: vk.window_attention(qkv, num_heads=3, window_size=7, shift_size=3, rel_pos_bias=t),
}
for name, call in calls.items():
    with vk.use_backend("cpu"):
        got = call()
    with vk.use_backend("reference"):
        want = call()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
print("wheel smoke test OK:", isa)
PY
