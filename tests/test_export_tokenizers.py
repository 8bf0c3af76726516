"""`mmfm export --tokenizers DIR`: DIR laid out as an export's tokenizers/<m>/ or as `mmfm demo`'s
tokenizers/<m>/tokenizer/ (training run folders) gives the same loadable export; anything else is an
error naming the folder, raised before anything is written. Before, the demo layout was copied as
it was and the export failed only when loaded ("no text tokenizer at export/tokenizers/text")."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mmfm.models import ModelConfig
from mmfm.models.transformer import Transformer
from mmfm.tokenizers.text import TextConfig, TextTokenizer
from mmfm.vocab import Vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "red green blue circle square moves left right top bottom a the on of".split()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_toks")
    lines = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8)) for i in range(400)]
    tok = TextTokenizer(TextConfig(model_type="bpe", vocab_size=300)).fit(lines)
    # the demo's layout: <m>/ is the training run (logs, checkpoints), <m>/tokenizer/ the saved tokenizer
    run = root / "demo_tokenizers" / "text"
    tok.save(str(run / "tokenizer"))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step_1.pt").write_bytes(b"not part of an export")
    (run / "train.jsonl").write_text("{}\n")
    tok.save(str(root / "export_tokenizers" / "text"))        # an export's layout
    vocab = Vocab(tok.vocab_size, {"image": 16})
    vocab.save(str(root / "vocab.json"))
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=vocab.size,
                      max_seq_len=64)
    return root, Transformer(cfg).eval(), lines


@pytest.mark.parametrize("layout", ["demo_tokenizers", "export_tokenizers"])
def test_both_layouts_give_an_export_whose_text_tokenizer_loads(parts, layout):
    from mmfm.export import write_folder
    from mmfm.generate.prompt import Tokenizers
    from mmfm.vocab import Vocab as V

    root, model, lines = parts
    out = write_folder(model.state_dict(), model.cfg, str(root / f"out_{layout}"), str(root / "vocab.json"),
                       str(root / layout))
    text = os.path.join(out, "tokenizers", "text")
    assert sorted(os.listdir(text)) == sorted(os.listdir(root / "export_tokenizers" / "text"))
    assert not os.path.exists(os.path.join(text, "checkpoints"))       # the run's files stay behind
    toks = Tokenizers(os.path.join(out, "tokenizers"), V.load(os.path.join(out, "vocab.json")))
    ids = toks["text"].encode(lines[3])
    assert ids.numel() > 0 and toks["text"].decode(ids) == lines[3]


def test_a_folder_without_tokenizers_is_named_before_anything_is_written(parts, tmp_path):
    from mmfm.export import write_folder

    root, model, _ = parts
    bad = tmp_path / "toks"
    shutil.copytree(root / "demo_tokenizers", bad)
    (bad / "image").mkdir()                                            # no tokenizer.yaml anywhere in it
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"image.*tokenizer\.yaml|tokenizer\.yaml.*image"):
        write_folder(model.state_dict(), model.cfg, str(out), str(root / "vocab.json"), str(bad))
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        write_folder(model.state_dict(), model.cfg, str(out), str(root / "vocab.json"), str(tmp_path / "nowhere"))


def test_cli_bad_input_exits_2_with_a_message_not_a_traceback(parts, tmp_path):
    bad = tmp_path / "toks"
    (bad / "audio").mkdir(parents=True)
    p = subprocess.run([sys.executable, "-m", "mmfm.cli", "export", str(tmp_path / "no_run"), "--out",
                        str(tmp_path / "out"), "--tokenizers", str(bad)], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert p.returncode == 2 and "mmfm export:" in p.stderr and "Traceback" not in p.stderr
