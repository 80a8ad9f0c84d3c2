"""The bad-input corpus: every case is one user mistake or one bad file, run through the
`fewstep` command as a user would, asserting the exit code and the one-line message.

Exit codes: 2 for bad input or usage, 1 for a failed check (NaN/Inf in a generation,
the parity gate). No case may print a traceback (they only appear with --debug), and
stderr — Python's and the C libraries' alike (ONNX Runtime logs to file descriptor 2) —
must be exactly one non-empty line: the error.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnx_oracle  # noqa: E402

from fewstep.runtime.cli import main as fewstep_main  # noqa: E402
from fewstep.runtime.meta import META_KEY  # noqa: E402


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    code: int
    message: str


CASES = [
    # -- model files -------------------------------------------------------------------
    Case("onnx-truncated", ("sample", "--model", "{truncated}", "--out", "{tmp}/g.png"), 2,
         "is not an ONNX model"),
    Case("onnx-random-bytes", ("sample", "--model", "{random}", "--out", "{tmp}/g.png"), 2,
         "is not an ONNX model"),
    Case("onnx-empty-file", ("info", "{empty}"), 2, "is not an ONNX model"),
    Case("onnx-no-metadata", ("sample", "--model", "{nometa}", "--out", "{tmp}/g.png"), 2,
         "has no fewstep metadata"),
    Case("onnx-future-schema", ("info", "{future}"), 2,
         "newer than this fewstep supports"),
    Case("onnx-metadata-not-json", ("info", "{notjson}"), 2, "metadata is not valid JSON"),
    Case("onnx-metadata-disagrees-with-graph",
         ("sample", "--model", "{renamed}", "--out", "{tmp}/g.png"), 2,
         "re-export"),
    Case("onnx-metadata-wrong-image-size",
         ("sample", "--model", "{wrongsize}", "--out", "{tmp}/g.png"), 2,
         "but the graph has"),
    Case("onnx-missing-weights-file",
         ("sample", "--model", "{noweights}", "--out", "{tmp}/g.png"), 2,
         "which is missing beside it"),
    Case("onnx-truncated-weights-file",
         ("sample", "--model", "{shortweights}", "--out", "{tmp}/g.png"), 2,
         "onnxruntime cannot load"),
    Case("onnx-metadata-huge-number", ("info", "{hugenum}"), 2,
         "schedule.beta_start: 100000000000000000...000000000000000000 (401 chars) is too "
         "large for a number"),
    Case("onnx-metadata-huge-number-sample",
         ("sample", "--model", "{hugenum}", "--out", "{tmp}/g.png"), 2, "is too large"),
    Case("model-missing", ("sample", "--model", "{tmp}/nope.onnx", "--out", "{tmp}/g.png"), 2,
         "does not exist"),
    Case("model-is-a-folder", ("sample", "--model", "{guided_dir}", "--out", "{tmp}/g.png"), 2,
         "is a folder, not a model file; pass the model file inside it: --model "),
    Case("info-on-a-folder", ("info", "{guided_dir}"), 2,
         "is a folder, not a model file; pass the model file inside it: "),
    Case("plan-without-sidecar", ("info", "{plan_nosidecar}"), 2, "no sidecar"),
    Case("plan-sidecar-malformed", ("info", "{plan_badsidecar}"), 2, "model.plan.json"),
    # -- references out of the model's folder, hostile strings, sizes -------------------
    Case("weights-absolute-path", ("info", "{weights_abs}"), 2, "not a plain path inside"),
    Case("weights-dotdot-path", ("sample", "--model", "{weights_up}", "--out", "{tmp}/g.png"),
         2, "'../secret.bin' of"),
    Case("weights-symlink-out", ("sample", "--model", "{weights_link}", "--out",
                                 "{tmp}/g.png"), 2, "outside the model's folder"),
    Case("sibling-symlink-out", ("info", "{sibling_link}"), 2,
         "graph file 'model.step.onnx' of"),
    Case("triton-weights-dotdot", ("export-triton", "{weights_up}", "--out", "{tmp}/repo"), 2,
         "outside the model's folder"),
    Case("class-name-escapes", ("info", "{escapes}"), 2,
         "class_names[0]: '\\x1b[2J' holds the unprintable character"),
    Case("onnx-over-2gib", ("info", "{sparse_3g}"), 2, "more than an ONNX file can hold"),
    Case("init-image-bomb", ("sample", "--model", "{guided}", "--init-image", "{bomb_png}",
                             "--out", "{tmp}/g.png"), 2, "decompression bomb"),
    Case("out-name-too-long", ("sample", "--model", "{guided}", "--out", "{tmp}/{long}.png"),
         2, "too long for the file system"),
    Case("model-name-too-long", ("sample", "--model", "{tmp}/{long}.onnx", "--out",
                                 "{tmp}/g.png"), 2, "too long for the file system"),
    # -- checkpoints ---------------------------------------------------------------------
    Case("checkpoint-groups-zero", ("export", "{groups0_pt}", "--out", "{tmp}/m.onnx"), 2,
         "groups=0 must be a whole number"),
    Case("checkpoint-step-not-a-number", ("export", "{steplist_pt}", "--out", "{tmp}/m.onnx"),
         2, "step=[1, 2] must be a whole number"),
    Case("checkpoint-preset-disagrees", ("export", "{preset_pt}", "--out", "{tmp}/m.onnx"), 2,
         "preset 'base' in the metadata has base_channels=128"),
    Case("checkpoint-not-a-checkpoint", ("export", "{junk_pt}", "--out", "{tmp}/m.onnx"), 2,
         "is not a readable PyTorch checkpoint"),
    Case("checkpoint-needs-pickle", ("export", "{pickled_pt}", "--out", "{tmp}/m.onnx"), 2,
         "needs pickle to load"),
    Case("checkpoint-other-torch-file", ("export", "{other_pt}", "--out", "{tmp}/m.onnx"), 2,
         "not a fewstep checkpoint"),
    # -- sampler arguments ---------------------------------------------------------------
    Case("steps-zero", ("sample", "--model", "{guided}", "--steps", "0", "--out", "{tmp}/g.png"),
         2, "steps=0 must be a whole number >= 1"),
    Case("steps-negative",
         ("sample", "--model", "{guided}", "--steps", "-3", "--out", "{tmp}/g.png"), 2,
         "steps=-3 must be a whole number >= 1"),
    Case("steps-above-T",
         ("sample", "--model", "{guided}", "--steps", "1200", "--out", "{tmp}/g.png"), 2,
         "steps=1200 exceeds num_train_timesteps=1000 recorded in model.onnx; "
         "pass steps <= 1000"),
    Case("eta-negative",
         ("sample", "--model", "{guided}", "--eta", "-0.1", "--out", "{tmp}/g.png"), 2,
         "eta=-0.1 is outside [0, 1]"),
    Case("eta-above-one",
         ("sample", "--model", "{guided}", "--eta", "1.5", "--out", "{tmp}/g.png"), 2,
         "eta=1.5 is outside [0, 1]"),
    Case("label-out-of-range",
         ("sample", "--model", "{guided}", "--labels", "7", "--out", "{tmp}/g.png"), 2,
         "outside the model's classes 0..2"),
    Case("label-unknown-name",
         ("sample", "--model", "{guided}", "--labels", "volcano", "--out", "{tmp}/g.png"), 2,
         "label 'volcano' is not a class of this model"),
    Case("labels-for-unconditional",
         ("sample", "--model", "{uncond}", "--labels", "1", "--out", "{tmp}/g.png"), 2,
         "this model is unconditional"),
    Case("labels-count-mismatch",
         ("sample", "--model", "{guided}", "--n", "4", "--labels", "0", "1",
          "--out", "{tmp}/g.png"), 2, "2 labels given for n=4 images"),
    Case("guidance-without-guidance-graph",
         ("sample", "--model", "{plain}", "--guidance", "2", "--out", "{tmp}/g.png"), 2,
         "needs a graph exported with --guidance"),
    Case("guidance-on-unconditional",
         ("sample", "--model", "{uncond}", "--guidance", "2", "--out", "{tmp}/g.png"), 2,
         "needs a conditional model with null conditioning"),
    Case("guidance-negative",
         ("sample", "--model", "{guided}", "--guidance", "-1", "--out", "{tmp}/g.png"), 2,
         "guidance=-1.0 must be a number in [0, 50]"),
    Case("n-zero", ("sample", "--model", "{guided}", "--n", "0", "--out", "{tmp}/g.png"), 2,
         "0 must be at least 1"),
    Case("n-huge",
         ("sample", "--model", "{guided}", "--n", "1000000000", "--out", "{tmp}/g.png"), 2,
         "argument --n: 1000000000 is more than 10000, the most images one grid holds; "
         "pass at most 10000"),
    Case("scale-huge",
         ("sample", "--model", "{guided}", "--scale", "100000", "--out", "{tmp}/g.png"), 2,
         "argument --scale: 100000 is more than 64"),
    Case("grid-too-large",
         ("sample", "--model", "{guided}", "--n", "9000", "--scale", "64",
          "--out", "{tmp}/g.png"), 2, "over the limit of 100 megapixels; pass --scale"),
    Case("seed-negative",
         ("sample", "--model", "{guided}", "--seed", "-1", "--out", "{tmp}/g.png"), 2,
         "-1 must be 0 or more"),
    Case("spacing-unknown",
         ("sample", "--model", "{guided}", "--spacing", "middle", "--out", "{tmp}/g.png"), 2,
         "invalid choice: 'middle'"),
    Case("backend-unknown",
         ("sample", "--model", "{guided}", "--backend", "cudnn", "--out", "{tmp}/g.png"), 2,
         "backend='cudnn' is unknown; use one of auto, ort, ort-cpu"),
    Case("mask-without-init-image",
         ("sample", "--model", "{guided}", "--mask", "{mask_png}", "--out", "{tmp}/g.png"), 2,
         "--mask needs --init-image"),
    Case("strength-zero",
         ("sample", "--model", "{guided}", "--init-image", "{init_png}", "--strength", "0",
          "--out", "{tmp}/g.png"), 2, "strength=0.0 must be in (0, 1]"),
    Case("init-image-unreadable",
         ("sample", "--model", "{guided}", "--init-image", "{junk_png}",
          "--out", "{tmp}/g.png"), 2, "cannot read image"),
    Case("output-folder-missing",
         ("sample", "--model", "{guided}", "--out", "{tmp}/no/such/dir/g.png"), 2,
         "output folder"),
    Case("output-is-a-directory", ("sample", "--model", "{guided}", "--out", "{tmp}"), 2,
         "is a directory"),
    Case("output-parent-is-a-file",
         ("sample", "--model", "{guided}", "--out", "{init_png}/g.png"), 2,
         "which is a file, not a folder"),
    Case("output-extension-unknown",
         ("sample", "--model", "{guided}", "--out", "{tmp}/g.txt"), 2,
         "ends in '.txt', an image format this Pillow cannot write; end the file name in one "
         "of .png, .jpg"),
    Case("output-without-extension",
         ("sample", "--model", "{guided}", "--out", "{tmp}/grid"), 2,
         "has no file extension"),
    Case("unknown-command", ("smaple",), 2, "unknown command 'smaple'"),
    # -- training data -------------------------------------------------------------------
    Case("images-unreadable",
         ("train", "--data", "{bad_folder}", "--preset", "tiny", "--steps", "1",
          "--out", "{tmp}/run"), 2, "unreadable images under"),
    Case("images-none", ("train", "--data", "{empty_folder}", "--preset", "tiny", "--steps", "1",
                         "--out", "{tmp}/run"), 2, "no images"),
    Case("images-class-name-escapes",
         ("train", "--data", "{escape_folder}", "--preset", "tiny", "--steps", "1",
          "--out", "{tmp}/run"), 2, "its name holds the unprintable character"),
    Case("images-folder-missing",
         ("train", "--data", "{tmp}/nowhere", "--preset", "tiny", "--steps", "1",
          "--out", "{tmp}/run"), 2, "nowhere"),
    # -- numerical failure: a failed check, exit 1 ---------------------------------------
    Case("nan-in-generation",
         ("sample", "--model", "{overflow}", "--steps", "4", "--out", "{tmp}/nan.png"), 1,
         "produced NaN/Inf"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_artifact: Path,
          tiny_checkpoint: Path) -> dict[str, str]:
    from PIL import Image

    tmp = tmp_path_factory.mktemp("corpus")
    f: dict[str, str] = {"tmp": str(tmp)}

    def artifact(name: str, meta: object, samplers: tuple = (), **kw: object) -> str:
        folder = tmp / name
        folder.mkdir()
        x0 = onnx_oracle.pixel_x0(meta)  # type: ignore[arg-type]
        return str(onnx_oracle.write_artifact(folder, meta, x0, samplers=samplers,  # type: ignore[arg-type]
                                              **kw))

    cond = onnx_oracle.make_meta("epsilon", num_classes=3)
    f["guided"] = artifact("guided", cond.for_graph(guidance=True),
                           samplers=((4, "trailing", 0.0, "uint8"),))
    f["guided_dir"] = str(Path(f["guided"]).parent)
    f["plain"] = artifact("plain", cond)
    f["uncond"] = artifact("uncond", onnx_oracle.make_meta("epsilon"))
    f["overflow"] = artifact("overflow", onnx_oracle.make_meta("epsilon"), step=False,
                             bias_x=3e38)

    real = Path(f["plain"]).read_bytes()
    (tmp / "truncated.onnx").write_bytes(real[: len(real) // 3])
    f["truncated"] = str(tmp / "truncated.onnx")
    (tmp / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    f["random"] = str(tmp / "random.onnx")
    (tmp / "empty.onnx").write_bytes(b"")
    f["empty"] = str(tmp / "empty.onnx")
    meta = onnx_oracle.make_meta("epsilon")
    x0 = onnx_oracle.pixel_x0(meta)
    f["nometa"] = str(onnx_oracle.write(tmp / "nometa.onnx", meta, x0, metadata=""))
    future = json.loads(meta.to_json())
    future["schema_version"] = 99
    f["future"] = str(onnx_oracle.write(tmp / "future.onnx", meta, x0,
                                        metadata=json.dumps(future)))
    f["notjson"] = str(onnx_oracle.write(tmp / "notjson.onnx", meta, x0, metadata="{oops"))
    f["renamed"] = str(onnx_oracle.write(tmp / "renamed.onnx", meta, x0,
                                         rename={"t": "timestep"}))
    bigger = onnx_oracle.make_meta("epsilon", size=16)
    model = onnx_oracle.build(meta, x0)
    import onnx
    onnx.helper.set_model_props(model, {META_KEY: bigger.to_json()})
    onnx.save_model(model, str(tmp / "wrongsize.onnx"))
    f["wrongsize"] = str(tmp / "wrongsize.onnx")
    # An exported artifact whose shared weights file went missing.
    shutil.copytree(tiny_artifact.parent, tmp / "noweights")
    for w in (tmp / "noweights").glob("*.bin"):
        w.unlink()
    f["noweights"] = str(tmp / "noweights" / "model.onnx")
    # ... and one whose weights file was cut short (an interrupted copy).
    shutil.copytree(tiny_artifact.parent, tmp / "shortweights")
    for w in (tmp / "shortweights").glob("*.bin"):
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    f["shortweights"] = str(tmp / "shortweights" / "model.onnx")
    huge = json.loads(meta.to_json())
    huge["schedule"]["beta_start"] = 10**400  # beyond float64: was an OverflowError
    f["hugenum"] = str(onnx_oracle.write(tmp / "hugenum.onnx", meta, x0,
                                         metadata=json.dumps(huge)))
    (tmp / "plans").mkdir()
    (tmp / "plans" / "model.plan").write_bytes(b"\x00" * 64)
    f["plan_nosidecar"] = str(tmp / "plans" / "model.plan")
    (tmp / "plans2").mkdir()
    (tmp / "plans2" / "model.plan").write_bytes(b"\x00" * 64)
    (tmp / "plans2" / "model.plan.json").write_text("{not json")
    f["plan_badsidecar"] = str(tmp / "plans2" / "model.plan")

    # Weights referenced out of the folder: absolute, ../, a symlink; a symlinked sibling.
    (tmp / "secret.bin").write_bytes(b"not for fewstep")
    for name, location in (("weights_abs", str(tmp / "secret.bin")),
                           ("weights_up", "../secret.bin"), ("weights_link", "w.bin")):
        folder = tmp / name
        folder.mkdir()
        model = onnx_oracle.build(cond, onnx_oracle.pixel_x0(cond))
        onnx.external_data_helper.convert_model_to_external_data(
            model, all_tensors_to_one_file=True, location="w.bin", size_threshold=256)
        onnx.save_model(model, str(folder / "model.onnx"))
        for init in model.graph.initializer:
            for entry in init.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save_model(model, str(folder / "model.onnx"))
        f[name] = str(folder / "model.onnx")
    (tmp / "weights_link" / "w.bin").unlink()
    (tmp / "weights_link" / "w.bin").symlink_to(tmp / "secret.bin")
    shutil.copytree(Path(f["plain"]).parent, tmp / "sibling_link")
    (tmp / "sibling_link" / "model.step.onnx").unlink()
    (tmp / "sibling_link" / "model.step.onnx").symlink_to(Path(f["guided"]).with_name(
        "model.step.onnx"))
    f["sibling_link"] = str(tmp / "sibling_link" / "model.onnx")
    esc = json.loads(cond.to_json())
    esc["class_names"] = ["\x1b[2J", "b", "c"]
    f["escapes"] = str(onnx_oracle.write(tmp / "escapes.onnx", cond, onnx_oracle.pixel_x0(cond),
                                         metadata=json.dumps(esc)))
    with open(tmp / "sparse.onnx", "wb") as sparse:
        sparse.truncate(3 * 1024**3)
    f["sparse_3g"] = str(tmp / "sparse.onnx")
    f["long"] = "n" * 300
    bomb = io.BytesIO()
    Image.new("L", (8, 8)).save(bomb, format="PNG")
    raw = bomb.getvalue()  # IHDR's width and height (bytes 16..24) set to 40000 x 40000
    ihdr = raw[12:16] + (40000).to_bytes(4, "big") * 2 + raw[24:29]
    raw = raw[:16] + ihdr[4:] + zlib.crc32(ihdr).to_bytes(4, "big") + raw[33:]
    (tmp / "bomb.png").write_bytes(raw)
    f["bomb_png"] = str(tmp / "bomb.png")
    ck = torch.load(tiny_checkpoint, weights_only=True)
    for name, edit in (("groups0_pt", lambda c: c["unet_config"].__setitem__("groups", 0)),
                       ("steplist_pt", lambda c: c.__setitem__("step", [1, 2])),
                       ("preset_pt", _preset_base)):
        bad_ck = copy.deepcopy(ck)
        edit(bad_ck)
        torch.save(bad_ck, tmp / f"{name}.pt")
        f[name] = str(tmp / f"{name}.pt")
    (tmp / "escape_images" / "bad\x1b[31mname").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
        tmp / "escape_images" / "bad\x1b[31mname" / "a.png")
    f["escape_folder"] = str(tmp / "escape_images")

    (tmp / "junk.pt").write_bytes(b"PK\x03\x04 this is no checkpoint")
    f["junk_pt"] = str(tmp / "junk.pt")
    torch.save({"format": "fewstep-checkpoint", "version": 1, "payload": Evil()},
               tmp / "pickled.pt")
    f["pickled_pt"] = str(tmp / "pickled.pt")
    torch.save({"state_dict": {"w": torch.zeros(3)}}, tmp / "other.pt")
    f["other_pt"] = str(tmp / "other.pt")

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp / "mask.png")
    f["mask_png"] = str(tmp / "mask.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp / "init.png")
    f["init_png"] = str(tmp / "init.png")
    (tmp / "junk.png").write_bytes(b"\x89PNG but not really")
    f["junk_png"] = str(tmp / "junk.png")

    bad = tmp / "bad_images" / "cls"
    bad.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad / "ok.png")
    (bad / "broken.png").write_bytes(b"not an image")
    (bad / "empty.jpg").write_bytes(b"")
    f["bad_folder"] = str(tmp / "bad_images")
    (tmp / "no_images" / "cls").mkdir(parents=True)
    (tmp / "no_images" / "cls" / "notes.txt").write_text("no pictures here")
    f["empty_folder"] = str(tmp / "no_images")
    return f


def _preset_base(ck: dict) -> None:
    meta = json.loads(ck["meta"])
    meta["train_config"]["preset"] = "base"  # but the network is the tiny one
    ck["meta"] = json.dumps(meta)


class Evil:
    """Any class: a checkpoint that needs it needs pickle, and is refused."""


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, files: dict[str, str], capfd: pytest.CaptureFixture[str]
                   ) -> None:
    argv = [a.format(**files) for a in case.argv]
    if argv[0] == "export-triton":  # python -m fewstep.export.triton
        from fewstep.export import triton

        code = triton.main(argv[1:])
    else:
        code = fewstep_main(argv)
    out, err = capfd.readouterr()  # file descriptors: C libraries' output is caught too
    assert code == case.code, err
    assert case.message in err, err
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err  # the error line and nothing else (no ORT log, no progress)
    assert "error" in lines[0], err
    assert not out.strip(), out  # nothing on stdout: no result path for a failure
    assert not list(Path(files["tmp"]).glob("**/.fewstep-tmp*"))


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


def test_debug_shows_the_traceback(files: dict[str, str],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="steps=0"):
        fewstep_main(["sample", "--model", files["guided"], "--steps", "0", "--debug",
                      "--out", os.path.join(files["tmp"], "g.png")])


def test_read_only_output_folder(files: dict[str, str], capsys: pytest.CaptureFixture[str]
                                 ) -> None:
    folder = Path(files["tmp"]) / "readonly"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write to a 0555 folder (root)")
        code = fewstep_main(["sample", "--model", files["guided"],
                             "--out", str(folder / "g.png")])
        assert code == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        folder.chmod(0o755)
