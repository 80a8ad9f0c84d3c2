"""Imported models on ONNX Runtime's CUDA EP against its CPU EP: same latents, same
conditioning. Usage: python3 gpu_byom.py DIR (DIR holds policy.onnx and ddpm.onnx, as the
README's "Bring your own model" commands write them)."""

import sys

import numpy as np
import onnxruntime as ort

from fewstep.runtime.pipeline import Pipeline

print("ort", ort.__version__, ort.get_available_providers())
here = sys.argv[1]
obs = np.random.default_rng(0).standard_normal((4, 36)).astype(np.float32)
cases = [("policy.onnx", (4, 8), dict(cond={"global_cond": obs})),
         ("ddpm.onnx", (4, 10), dict(labels=[0, 1, 2, 3]))]
rows = []
for name, step_counts, kw in cases:
    cpu = Pipeline.load(f"{here}/{name}", backend="ort-cpu")
    gpu = Pipeline.load(f"{here}/{name}", backend="ort-cuda")
    for steps in step_counts:
        shape = (4, *cpu.meta.sample_shape)
        lat = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        a = cpu.generate(4, steps, latents=lat, output="samples", **kw)
        b = gpu.generate(4, steps, latents=lat, output="samples", **kw)
        peak = float(a.max() - a.min())
        mse = float(np.mean((a - b) ** 2))
        psnr = float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)
        info = gpu.last_info
        assert info is not None
        rows.append((name, steps, info.path, info.backend, float(np.abs(a - b).max()), psnr))
print(f"{'model':<12} {'steps':>5} {'path':<9} {'backend':<9} {'max abs':>9} {'PSNR dB':>8}")
for r in rows:
    print(f"{r[0]:<12} {r[1]:>5} {r[2]:<9} {r[3]:<9} {r[4]:>9.3g} {r[5]:>8.1f}")
