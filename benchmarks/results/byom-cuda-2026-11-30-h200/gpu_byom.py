"""Imported models on the CUDA EP against ORT CPU: same latents, same cond."""
import sys, numpy as np, onnxruntime as ort
from fewstep.runtime.pipeline import Pipeline
print("ort", ort.__version__, ort.get_available_providers())
here = sys.argv[1]
rows = []
for name, kw in [("policy.onnx", dict(cond={"global_cond": np.random.default_rng(0).standard_normal((4, 36)).astype(np.float32)})),
                 ("ddpm.onnx", dict(labels=[0, 1, 2, 3]))]:
    cpu = Pipeline.load(f"{here}/{name}", backend="ort-cpu")
    gpu = Pipeline.load(f"{here}/{name}", backend="ort-cuda")
    for steps in sorted({g.meta.graph.steps for g in [] } | {8 if "policy" in name else 10, 4}):
        lat = np.random.default_rng(1).standard_normal((4, *cpu.meta.sample_shape)).astype(np.float32)
        a = cpu.generate(4, steps, latents=lat, output="samples", **kw)
        b = gpu.generate(4, steps, latents=lat, output="samples", **kw)
        peak = float(a.max() - a.min()); mse = float(np.mean((a - b) ** 2))
        psnr = float("inf") if mse == 0 else 10 * np.log10(peak ** 2 / mse)
        rows.append((name, steps, gpu.last_path, gpu.last_info.backend, float(np.abs(a - b).max()), psnr))
print(f"{'model':<12} {'steps':>5} {'path':<9} {'backend':<9} {'max abs':>9} {'PSNR dB':>8}")
for r in rows:
    print(f"{r[0]:<12} {r[1]:>5} {r[2]:<9} {r[3]:<9} {r[4]:>9.3g} {r[5]:>8.1f}")
