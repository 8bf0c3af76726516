"""An installed mmfm works outside the checkout: the wheel goes into a fresh virtualenv, and from
another directory `mmfm doctor`, `mmfm bench sampling --quick`, a tiny `mmfm generate` and the
shipped demo configs run with mmfm imported from that venv, not from the repository.

Cheap on purpose: the wheel packages the extension already built in this checkout
(MMFM_PREBUILT=1, setup.py) instead of compiling it again, and the venv borrows torch and the
other dependencies from the running interpreter (a .pth file, added after mmfm is installed so
pip never sees the checkout's own mmfm install). Measured on 2 cores shared with other jobs (load
average ~15): 42-86 s in all; the wheel 8 s, the venv and install 6 s, and 7-13 s for each of the
four commands, mostly the interpreter importing torch.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, cwd, env, timeout=300):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def _build_wheel(tmp) -> str:
    """A wheel of this checkout with its built extension, built from a copy of the files a wheel
    needs (so no build/ or egg-info is left in the checkout)."""
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(os.path.join(REPO, name), src)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "configs")   # mmfm/configs: only what setup.py copies
    shutil.copytree(os.path.join(REPO, "mmfm"), os.path.join(src, "mmfm"), ignore=ignore)
    shutil.copytree(os.path.join(REPO, "configs"), os.path.join(src, "configs"))
    dist = os.path.join(tmp, "dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "--no-cache-dir",
          "-q", "-w", dist, src], cwd=tmp, env={**os.environ, "MMFM_PREBUILT": "1"})
    (wheel,) = glob.glob(os.path.join(dist, "mmfm-*.whl"))
    return wheel


def _venv_with(wheel: str, tmp) -> tuple[str, str]:
    """(python, site-packages) of a fresh venv holding the wheel, with this interpreter's
    packages (torch, deepspeed, ...) visible behind it."""
    venv = os.path.join(tmp, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = os.path.join(venv, "bin", "python")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         cwd=tmp, env=os.environ.copy())
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(site, "outer_deps.pth"), "w") as f:   # plain paths: the outer .pth files do not run
        f.write("\n".join(sorted(outer)) + "\n")
    return python, site


def _tiny_export(root: str) -> str:
    """A tiny text-only export: a sentencepiece tokenizer fitted here, its vocabulary, an untrained model."""
    import torch

    from mmfm.export import write_folder
    from mmfm.models import ModelConfig, Transformer
    from mmfm.tokenizers.text import TextConfig, TextTokenizer
    from mmfm.vocab import Vocab

    words = ["red", "green", "blue", "circle", "square", "a", "the", "small", "large", "wave"]
    texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) for i in range(200)]
    tok = TextTokenizer(TextConfig(vocab_size=300)).fit(texts)
    tok.save(os.path.join(root, "tokenizers", "text"))
    vocab = Vocab(tok.vocab_size, {})
    vocab.save(os.path.join(root, "vocab.json"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                                    vocab_size=vocab.size, max_seq_len=64))
    return write_folder(model.state_dict(), model.cfg, os.path.join(root, "export"), os.path.join(root, "vocab.json"),
                        os.path.join(root, "tokenizers"))


def test_installed_wheel_runs_outside_the_checkout(tmp_path):
    if not glob.glob(os.path.join(REPO, "mmfm", "_C*.so")):
        pytest.skip("needs the extension built in the checkout (pip install --no-build-isolation -e .)")
    wheel = _build_wheel(str(tmp_path))
    python, site = _venv_with(wheel, str(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    mmfm = os.path.join(os.path.dirname(python), "mmfm")

    # mmfm and its extension come from the venv; the demo's configs come with the package and name
    # their model and DeepSpeed files relative to themselves, so they load without the checkout and
    # from any working directory
    probe = ("import mmfm, mmfm._C; from mmfm.typed_config import packaged_config; "
             "from mmfm.train.config import load_run_config; c = load_run_config(packaged_config('pretrain/demo.yaml')); "
             "print(mmfm.__file__, packaged_config(), c.model.dim, c.deepspeed['zero_optimization']['stage'])")
    where, folder, dim, stage = _run([python, "-c", probe], elsewhere, env).stdout.split()
    assert where.startswith(site) and not where.startswith(REPO), where
    assert folder.startswith(site) and (dim, stage) == ("128", "2"), (folder, dim, stage)

    doctor = _run([mmfm, "doctor"], elsewhere, env)
    assert "loaded" in doctor.stdout, doctor.stdout

    _run([mmfm, "bench", "sampling", "--quick", "--mode", "min_p", "--json", "s.json"], elsewhere, env)
    records = json.loads((elsewhere / "s.json").read_text())
    assert {r["impl"] for r in records} >= {"mmfm", "reference", "floor_sum", "floor_copy"}
    assert all(r["bench"] == "sampling" and r["case"]["mode"] == "min_p" and r["ms"] > 0 for r in records)

    export = _tiny_export(str(tmp_path / "tiny"))
    _run([mmfm, "generate", "--model", export, "--prompt", "a red", "--to", "text", "--out", "out.txt",
          "--max-new-tokens", "4", "--no-progress"], elsewhere, env)
    assert (elsewhere / "out.txt").exists()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["out.txt", "s.json"], "a command wrote elsewhere unasked"
