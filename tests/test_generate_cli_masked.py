"""Masked editing and BAMM's cascade through Bundle.generate and `mmfm generate` on a tiny export:
the edit-mask spec, token and sample files as the block to edit, kept tokens untouched, the
command's output equal to the decoder called directly, and errors that name the bad argument."""
import json

import numpy as np
import pytest
import torch

from mmfm.generate import Bundle, SamplingConfig
from mmfm.generate.masked import cascade_decode, maskgit_decode, recap_decode
from mmfm.generate.masked_edit import edit_tokens, parse_edit_mask
from mmfm.generate.outputs import read_output, write_output
from mmfm.generate.prompt import build_prompt
from test_generate import build_export

L = 16   # the tiny export's image segment: 16 tokens


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Bundle.load(build_export(str(tmp_path_factory.mktemp("masked_cli"))))
    torch.set_num_threads(n)


def test_edit_mask_spec():
    def on(spec, n=L):
        return parse_edit_mask(spec, n).nonzero().flatten().tolist()

    assert on("0:4") == [0, 1, 2, 3]
    assert on("3,5, 14:") == [3, 5, 14, 15]
    assert on("-2:") == [14, 15] and on(":2,-1") == [0, 1, 15]
    assert on(":") == list(range(L))
    assert on("2:6,4:8") == [2, 3, 4, 5, 6, 7]          # overlapping spans are their union
    where = torch.zeros(L, dtype=torch.bool)
    where[7] = True
    assert torch.equal(parse_edit_mask(where, L), where)
    for bad, why in (("5:3", "A < B"), ("16", "selects no position"), ("a:b", "not an index"), ("", "expected"),
                     ("1:2:3", "not an index"), ("-17", "selects no position")):
        with pytest.raises(ValueError, match=why) as e:
            parse_edit_mask(bad, L, where="--edit-mask")
        assert str(e.value).startswith("--edit-mask")
    with pytest.raises(ValueError, match="no position"):
        parse_edit_mask(torch.zeros(L, dtype=torch.bool), L)
    with pytest.raises(ValueError, match=r"shape \[16\]"):
        parse_edit_mask(torch.ones(8, dtype=torch.bool), L)


def test_edit_tokens_from_token_and_sample_files(bundle, tmp_path):
    toks = bundle.tokenizers
    ids = torch.randint(0, 32, (L,), generator=torch.Generator().manual_seed(0))
    (tmp_path / "t.json").write_text(json.dumps(ids.tolist()))
    np.save(tmp_path / "t.npy", ids.numpy().astype(np.int32).reshape(4, 4))
    assert torch.equal(edit_tokens(str(tmp_path / "t.json"), "image", toks, L), ids)
    assert torch.equal(edit_tokens(str(tmp_path / "t.npy"), "image", toks, L), ids)
    img = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    write_output(str(tmp_path / "in.png"), "image", img)
    got = edit_tokens(str(tmp_path / "in.png"), "image", toks, L)
    assert torch.equal(got, toks["image"].encode(read_output(str(tmp_path / "in.png"), "image")).reshape(-1))
    (tmp_path / "short.json").write_text(json.dumps(ids[:10].tolist()))
    (tmp_path / "float.json").write_text(json.dumps([0.5] * L))
    (tmp_path / "big.json").write_text(json.dumps([40] * L))
    for path, why in (("short.json", "has 10 tokens; the segment has 16"), ("float.json", "integer token ids"),
                      ("big.json", r"local ids in \[0, 32\)"), ("x.wav", "--edit.*image input must be")):
        with pytest.raises((ValueError, FileNotFoundError), match=why):
            edit_tokens(str(tmp_path / path), "image", toks, L, where="--edit")
    with pytest.raises(FileNotFoundError, match="no such file"):
        edit_tokens(str(tmp_path / "none.json"), "image", toks, L)
    with pytest.raises(ValueError, match="not text"):
        edit_tokens(ids, "text", toks, L)


def _ref_kw(bundle, to="image"):
    v = bundle.vocab
    r = v.ranges[to]
    return dict(mask_id=v.mask_id, top_k=20, allowed_range=(r.start, r.stop),
                suffix_ids=[v.end_id(to), v.eos_id], modality_table=v.modality_table())


def test_editing_through_bundle_and_cli(bundle, tmp_path):
    from mmfm.cli import main

    v = bundle.vocab
    given = torch.randint(0, 32, (L,), generator=torch.Generator().manual_seed(2))
    tok_file = tmp_path / "given.json"
    tok_file.write_text(json.dumps(given.tolist()))
    where = parse_edit_mask("0:4,12:", L)
    s = bundle.generate(["a red circle", "the blue"], to="image", decoding="masked", steps=4, seed=3,
                        edit=str(tok_file), edit_mask="0:4,12:", sampling=SamplingConfig(top_k=20),
                        out=str(tmp_path / "api.png"))
    pre = build_prompt(v, bundle.tokenizers, "the blue", "image")
    ref, st = maskgit_decode(bundle.model, pre, L, steps=4, seed=4, block_ids=v.to_global("image", given),
                             edit_mask=where, **_ref_kw(bundle))
    assert st.full_passes == 4
    assert torch.equal(s[1].tokens, v.to_local("image", ref[0]))           # row i is seed + i
    for x in s:
        assert torch.equal(x.tokens[~where], given[~where])                 # kept tokens stay
    assert not all(torch.equal(x.tokens[where], given[where]) for x in s)   # the edited ones were regenerated
    # steps are capped at the edited count (2 here), and ReCAP takes the same edit
    r2 = bundle.generate("a red circle", to="image", decoding="masked", steps=8, recap=True, seed=3,
                         edit=given, edit_mask="5,9")[0]
    pre0 = build_prompt(v, bundle.tokenizers, "a red circle", "image")
    ref2, st2 = recap_decode(bundle.model, pre0, L, steps=2, full_every=2, seed=3, edit_mask=parse_edit_mask("5,9", L),
                             block_ids=v.to_global("image", given), **{**_ref_kw(bundle), "top_k": 0})
    assert torch.equal(r2.tokens, v.to_local("image", ref2[0])) and st2.steps == 2
    # the command line: the same rows, written to the same PNGs as the API's
    rc = main(["generate", "--model", bundle.folder, "--prompt", "a red circle", "--prompt", "the blue", "--to",
               "image", "--decode", "masked", "--steps", "4", "--seed", "3", "--top-k", "20", "--edit", str(tok_file),
               "--edit-mask", "0:4,12:", "--out", str(tmp_path / "cli.png"), "--no-progress"])
    assert rc == 0
    for i in (0, 1):
        assert (tmp_path / f"cli-{i}.png").read_bytes() == (tmp_path / f"api-{i}.png").read_bytes()
    # an image file as the block: its tokens are kept where the mask is False
    img = tmp_path / "in.png"
    write_output(str(img), "image", torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(5)))
    e = bundle.generate("x", to="image", decoding="masked", steps=2, edit=str(img), edit_mask="-3:")[0]
    assert torch.equal(e.tokens[:-3], edit_tokens(str(img), "image", bundle.tokenizers, L)[:-3])


def test_cascade_through_bundle_and_cli(bundle, tmp_path, capsys):
    from mmfm.cli import main

    v = bundle.vocab
    s = bundle.generate(["a red circle"], to="image", decoding="cascade", steps=3, refine=0.5, seed=7,
                        sampling=SamplingConfig(top_k=20), out=str(tmp_path / "api.png"))[0]
    pre = build_prompt(v, bundle.tokenizers, "a red circle", "image")
    ref, draft, st = cascade_decode(bundle.model, pre, L, refine=0.5, steps=3, seed=7, **_ref_kw(bundle))
    assert torch.equal(s.tokens, v.to_local("image", ref[0])) and st.full_passes == 3
    assert 0 < int((ref != draft).sum()) <= 8                  # only the refined half may change
    assert torch.equal(bundle.generate("a red circle", to="image", decoding="cascade", refine=0.0, seed=7,
                                       sampling=SamplingConfig(top_k=20))[0].tokens, v.to_local("image", draft[0]))
    rc = main(["generate", "--model", bundle.folder, "--prompt", "a red circle", "--to", "image", "--decode", "cascade",
               "--steps", "3", "--refine", "0.5", "--seed", "7", "--top-k", "20", "--out", str(tmp_path / "cli.png"),
               "--no-progress"])
    assert rc == 0 and (tmp_path / "cli.png").read_bytes() == (tmp_path / "api.png").read_bytes()
    capsys.readouterr()


@pytest.mark.parametrize("words, named", [
    (["--decode", "masked", "--edit", "{tok}", "--edit-mask", "9:3"], "--edit-mask"),
    (["--decode", "masked", "--edit", "{tok}"], "--edit-mask"),
    (["--decode", "masked", "--edit-mask", "0:4"], "--edit"),
    (["--edit", "{tok}", "--edit-mask", "0:4"], "--edit"),                         # --decode ar
    (["--decode", "masked", "--edit", "{dir}/missing.json", "--edit-mask", "0:4"], "missing.json"),
    (["--decode", "masked", "--edit", "{dir}/short.json", "--edit-mask", "0:4"], "--edit"),
    (["--decode", "cascade", "--refine", "1.5"], "--refine"),
    (["--decode", "cascade", "--steps", "0"], "'steps'"),
    (["--decode", "cascade", "--cfg-scale", "2"], "cfg_scale"),
])
def test_bad_arguments_name_the_argument(bundle, tmp_path, capsys, words, named):
    from mmfm.cli import main

    (tmp_path / "tok.json").write_text(json.dumps([1] * L))
    (tmp_path / "short.json").write_text(json.dumps([1] * 5))
    words = [w.format(tok=tmp_path / "tok.json", dir=tmp_path) for w in words]
    rc = main(["generate", "--model", bundle.folder, "--prompt", "x", "--to", "image", "--no-progress"] + words)
    err = capsys.readouterr().err
    assert rc == 2 and named in err, err


def test_eval_generate_tokens_masked_batches_rows_by_prompt_length(bundle):
    """The prompt eval's masked path (mmfm/eval/gen.py): rows of equal prompt length decode in one
    batch, each row the decoder's own output for that batch; rows come back in prompt order."""
    from mmfm.eval.gen import Sampling, generate_tokens

    v = bundle.vocab
    def prompt(*text):
        return torch.tensor([v.bos_id, v.begin_id("text"), *text, v.end_id("text"), v.begin_id("image")])

    prompts = [prompt(5, 6, 7), prompt(8, 9, 10, 11, 12), prompt(13, 14, 15), prompt(16, 17, 18, 19, 20)]
    s = Sampling(temperature=1.0, top_k=20, seed=5, batch_size=64, decode="masked", steps=3)
    got = generate_tokens(bundle.model, v, prompts, "image", L, s)
    assert got.shape == (4, L) and int(got.max()) < 32
    kw = {**_ref_kw(bundle), "steps": 3}
    first = maskgit_decode(bundle.model, torch.stack([prompts[0], prompts[2]]), L, seed=5, **kw)[0]
    second = maskgit_decode(bundle.model, torch.stack([prompts[1], prompts[3]]), L, seed=6, **kw)[0]
    assert torch.equal(got[[0, 2]], v.to_local("image", first))
    assert torch.equal(got[[1, 3]], v.to_local("image", second))
    with pytest.raises(ValueError, match="guidance"):
        generate_tokens(bundle.model, v, prompts, "image", L, Sampling(decode="masked", cfg_scale=2.0))
    with pytest.raises(ValueError, match="decode"):
        generate_tokens(bundle.model, v, prompts, "image", L, Sampling(decode="mask"))
    from mmfm.cli import build_parser

    a = build_parser().parse_args(["eval", "prompts", "--model", "m", "--decode", "masked", "--steps", "4"])
    assert (a.decode, a.steps) == ("masked", 4)
    # the hybrid attention and BAMM's cascade through the same path: each chunk the decoder's own output
    s = Sampling(temperature=1.0, top_k=20, seed=5, batch_size=64, decode="masked", steps=3, hybrid=True)
    got = generate_tokens(bundle.model, v, prompts, "image", L, s)
    want = maskgit_decode(bundle.model, torch.stack([prompts[0], prompts[2]]), L, seed=5, hybrid=True, **kw)[0]
    assert torch.equal(got[[0, 2]], v.to_local("image", want))
    s = Sampling(temperature=1.0, top_k=20, seed=5, batch_size=64, decode="cascade", steps=2, refine=0.5)
    got = generate_tokens(bundle.model, v, prompts, "image", L, s)
    kw.pop("steps")
    want = cascade_decode(bundle.model, torch.stack([prompts[1], prompts[3]]), L, seed=6, steps=2, refine=0.5, **kw)[0]
    assert torch.equal(got[[1, 3]], v.to_local("image", want))
    a = build_parser().parse_args(["eval", "prompts", "--model", "m", "--decode", "cascade", "--refine", "0.2"])
    assert (a.decode, a.refine, a.hybrid) == ("cascade", 0.2, False)
    with pytest.raises(ValueError, match="refine"):
        generate_tokens(bundle.model, v, prompts, "image", L, Sampling(decode="cascade", refine=1.5))
