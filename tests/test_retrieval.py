"""Retrieval protocols: FILIP's token-wise scoring (each direction by its own similarity matrix, padding
masks, several ranks) and Karpathy split files (COCO / Flickr30k), down to the command line's record."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from declip_ds.eval import report, retrieval
from tests.distributed import run_ranks
from tests.test_eval_suite import TINY, image_bytes, save_checkpoint, write_tar

FILIP_TINY = {**TINY, "model": {**TINY["model"], "token_dim": 8}, "method": {"name": "filip"}}


def filip_model(cfg=None):
    from declip_ds.config import from_dict
    from declip_ds.models import build_model

    torch.manual_seed(0)
    exp = from_dict(cfg or FILIP_TINY)
    return exp, build_model(exp.model).eval()


def brute_force_recalls(x, y, x_mask, y_mask, owners, ks):
    """Independent reference: the whole (Ni, Nt, Ti, Tt) tensor in float64, FILIP's two matrices by
    masked max / mean, and every rank counted query by query (ties against the query)."""
    x, y = x.double(), y.double()
    s = torch.einsum("ikd,jrd->ijkr", x, y)  # (Ni, Nt, Ti, Tt)
    xm = torch.ones(x.shape[:2], dtype=torch.bool) if x_mask is None else x_mask
    ym = torch.ones(y.shape[:2], dtype=torch.bool) if y_mask is None else y_mask
    best_r = s.masked_fill(~ym[None, :, None, :], float("-inf")).amax(dim=3)  # (Ni, Nt, Ti)
    s_i2t = (best_r * xm[:, None, :]).sum(-1) / xm.sum(-1)[:, None]  # (Ni, Nt)
    best_k = s.masked_fill(~xm[:, None, :, None], float("-inf")).amax(dim=2)  # (Ni, Nt, Tt)
    s_t2i = (best_k.nan_to_num(neginf=0.0) * ym[None]).sum(-1) / ym.sum(-1)[None, :]  # (Ni, Nt)

    def i2t_ranks(S):
        ranks = []
        for i in range(S.shape[0]):
            pos = owners == i
            best = S[i][pos].max()
            ranks.append(int(((S[i] >= best) & ~pos).sum()))
        return torch.tensor(ranks)

    def t2i_ranks(S):
        return torch.tensor([int(sum(1 for k in range(S.shape[0]) if k != owners[j] and S[k, j] >= S[owners[j], j]))
                             for j in range(S.shape[1])])

    out = {}
    for name, ranks in (("i2t", i2t_ranks(s_i2t)), ("t2i", t2i_ranks(s_t2i))):
        out.update({f"{name}_R@{k}": float((ranks < k).double().mean()) for k in ks})
    return out, s_i2t, s_t2i


def random_gallery(seed, Ni=9, Ti=4, Nt=17, Tt=6, d=5):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(Ni, Ti, d, generator=g), dim=-1)
    y = F.normalize(torch.randn(Nt, Tt, d, generator=g), dim=-1)
    lengths = torch.randint(1, Tt + 1, (Nt,), generator=g)
    mask = torch.arange(Tt)[None, :] < lengths[:, None]  # (Nt, Tt), every caption has a token
    owners = torch.cat([torch.arange(Ni), torch.randint(0, Ni, (Nt - Ni,), generator=g)])  # every image captioned
    return x, y, mask, owners


@pytest.mark.parametrize("masked", [True, False])
def test_token_retrieval_ranks_each_direction_by_its_own_matrix(masked):
    x, y, mask, owners = random_gallery(3)
    ks = (1, 2, 5)
    mask = mask if masked else None
    expected, s_i2t, s_t2i = brute_force_recalls(x, y, None, mask, owners, ks)
    got = retrieval.token_retrieval_metrics(x, y, owners, mask, ks=ks, chunk=4)
    assert {k: got[k] for k in expected} == pytest.approx(expected)
    assert (got["n_images"], got["n_texts"]) == (9, 17)
    assert got["mean_recall"] == pytest.approx(sum(expected.values()) / 6)
    # the two matrices rank differently here: scoring both directions with one of them would be caught
    swapped = retrieval.recall_from_scores(s_t2i, owners, ks=ks)
    assert any(swapped[k] != pytest.approx(expected[k]) for k in expected)
    # tokens that equal their image's: every image finds its captions first
    perfect = retrieval.token_retrieval_metrics(x, x[owners], owners, None, ks=(1,))
    assert perfect["i2t_R@1"] == 1.0 and perfect["t2i_R@1"] == 1.0
    same = retrieval.token_retrieval_metrics(torch.ones(3, 2, 4), torch.ones(5, 3, 4), torch.tensor([0, 0, 1, 2, 2]),
                                             ks=(1,))
    assert same["i2t_R@1"] == 0.0 and same["t2i_R@1"] == 0.0  # ties count against the query


def _shards(root, n_images=5, per_shard=3):
    root.mkdir(parents=True, exist_ok=True)
    captions = ["a red square", "a crimson box on the floor", "green", "a leaf", "blue sky over water",
                "a yellow lemon", "moss"]
    members = []
    for i in range(n_images):
        text = "\n".join(captions[(i + j) % len(captions)] for j in range(1 + i % 2))
        members.append((f"{i:03d}.png", image_bytes(i)))
        members.append((f"{i:03d}.txt", text.encode()))
    for s in range(0, n_images, per_shard):
        write_tar(root / f"{s // per_shard:05d}.tar", members[2 * s:2 * (s + per_shard)])
    return root


def test_token_embeddings_drop_only_padding(tmp_path):
    """mask_padding: positions past every caption's EOT are dropped, which changes no score; false keeps
    all context positions, unmasked (the DeCLIP reference's FILIP)."""
    from declip_ds.data.tokenizer import Tokenizer
    from declip_ds.data.transforms import eval_transform
    from declip_ds.methods.filip import text_token_mask

    _, model = filip_model()
    tok = Tokenizer(context_length=16)
    loader = retrieval.build_loader(_shards(tmp_path / "s"), eval_transform(32), 2)
    emb = retrieval.embed_tokens(model, tok, loader, mask_padding=True, text_batch=3)
    caps = [c for _, cs, _ in loader for c in cs]
    flat = [c for cs in caps for c in cs]
    ids = tok(flat)
    full_mask = text_token_mask(ids)
    assert emb.text_tokens.shape[1] == int(full_mask.sum(1).max()) < 16
    assert torch.equal(emb.text_mask, full_mask[:, :emb.text_tokens.shape[1]])
    with torch.no_grad():
        full = F.normalize(model.encode_text_tokens(ids).float(), dim=-1)  # (Nt, 16, d)
    L, m = emb.text_tokens.shape[1], emb.text_mask
    assert torch.allclose(emb.text_tokens[m], full[:, :L][m], atol=1e-6)  # batches of 3 captions, each
    # trimmed to its longest caption, then zero-padded (masked) to the longest of all
    trimmed = retrieval.token_retrieval_metrics(emb.image_tokens, emb.text_tokens, emb.text_to_image, emb.text_mask)
    whole = retrieval.token_retrieval_metrics(emb.image_tokens, full, emb.text_to_image, full_mask)
    assert trimmed == pytest.approx(whole)
    every = retrieval.embed_tokens(model, tok, loader, mask_padding=False)
    assert every.text_mask is None and every.text_tokens.shape[1] == 16
    assert torch.allclose(every.text_tokens, full, atol=1e-6)
    assert emb.image_tokens.shape == (5, 16, 8)  # 32 px / patch 8 = 16 patch tokens, token_dim 8


def _ranked_retrieval(rank, world, root, mask_padding):
    """(metrics, the images of the gallery gathered on this rank: None = none) of a token-wise retrieval."""
    from declip_ds.data.tokenizer import Tokenizer

    torch.set_num_threads(1)
    _, model = filip_model()
    held, gather = [], retrieval.gather_token_embeddings

    def recorded(emb, group=None):
        out = gather(emb, group)
        held.append(None if out is None else len(out.image_tokens))
        return out

    retrieval.gather_token_embeddings = recorded  # in this spawned process only
    run = lambda: retrieval.evaluate_retrieval(  # noqa: E731
        model, Tokenizer(context_length=16), root, image_size=32, batch_size=2, rank=rank, world_size=world,
        group=torch.distributed.group.WORLD, scoring="token", mask_padding=mask_padding)
    metrics = run()

    def out_of_memory(emb, group=None):  # rank 0's concatenation of the gathered parts (its memory peak) fails
        out = gather(emb, group)
        if out is not None:
            raise MemoryError("concatenating the gathered gallery")
        return out

    retrieval.gather_token_embeddings = out_of_memory
    try:
        run()
        failed = None
    except Exception as e:  # noqa: BLE001
        failed = type(e).__name__
    return metrics, held, failed


@pytest.mark.dist
def test_token_retrieval_on_two_ranks_equals_one_process(tmp_path):
    """Each rank embeds its own shard (captions of different lengths), the token embeddings are gathered on
    rank 0 alone (not on every rank: COCO's token gallery is GBs), padded to the longest caption and masked,
    and scored there: both ranks return what one process computes."""
    from declip_ds.data.tokenizer import Tokenizer

    root = _shards(tmp_path / "s", n_images=7, per_shard=4)  # rank 0: 4 images, rank 1: 3
    _, model = filip_model()
    one = retrieval.evaluate_retrieval(model, Tokenizer(context_length=16), root, image_size=32, batch_size=2,
                                       scoring="token")
    assert (one["n_images"], one["n_texts"]) == (7, 10)
    (m0, held0, failed0), (m1, held1, failed1) = run_ranks(_ranked_retrieval, 2, (root, True))
    assert m0 == pytest.approx(one) and m1 == pytest.approx(one)
    assert held0 == [7] and held1 == [None]
    # rank 0 alone runs out of memory concatenating the gathered gallery: every rank raises (rank 1 used to wait)
    assert (failed0, failed1) == ("MemoryError", "RankFailed")


def _counted_embedding(rank, world, root, scoring):
    """Embed this rank's shard (5 images on rank 0, 2 on rank 1), counting the tower forwards."""
    from declip_ds.data.tokenizer import Tokenizer
    from declip_ds.data.transforms import eval_transform

    torch.set_num_threads(1)
    _, model = filip_model()
    calls = {"image": 0, "text": 0}
    for name, kind in (("encode_image", "image"), ("encode_text", "text"), ("encode_image_tokens", "image"),
                       ("encode_text_tokens", "text")):
        def counted(*a, _f=getattr(model, name), _k=kind, **k):
            calls[_k] += 1
            return _f(*a, **k)
        setattr(model, name, counted)
    loader = retrieval.build_loader(root, eval_transform(32), 2, rank=rank, world_size=world)
    group = torch.distributed.group.WORLD
    if scoring == "token":
        emb = retrieval.embed_tokens(model, Tokenizer(context_length=16), loader, text_batch=2, group=group,
                                     image_size=32)
        n = (len(emb.image_tokens), len(emb.text_tokens))
    else:
        img, txt, _ = retrieval.embed(model, Tokenizer(context_length=16), loader, text_batch=2, group=group,
                                      image_size=32)
        n = (len(img), len(txt))
    return calls, n


@pytest.mark.dist
@pytest.mark.parametrize("scoring", [pytest.param("global", marks=pytest.mark.slow), "token"])  # one sync path
def test_ranks_with_unequal_shards_run_the_same_forwards(tmp_path, scoring):
    """Under ZeRO-3 every module forward is a collective: a rank with fewer images or caption chunks runs
    throwaway forwards, so both ranks call each tower equally often (no hang), embedding only their own data."""
    root = _shards(tmp_path / "s", n_images=7, per_shard=5)
    (c0, n0), (c1, n1) = run_ranks(_counted_embedding, 2, (root, scoring))
    assert n0 == (5, 7) and n1 == (2, 3)  # images, captions (image i has 1 + i % 2)
    # rank 0: batches of 2, 2 and 1 images with 3, 3 and 1 captions (2 + 2 + 1 chunks of 2); rank 1 alone
    # would run 1 image and 2 text forwards
    assert c0 == c1 == {"image": 3, "text": 5}


def _karpathy(root, dataset="coco"):
    """A dataset_<name>.json in Karpathy's layout: test, val and restval images, one with six captions."""
    images = []
    for i, split in enumerate(["test", "val", "test", "restval", "train"]):
        folder = "val2014" if split in ("test", "val") else "train2014"
        name = f"COCO_{folder}_{i:012d}.jpg"
        entry = {"filename": name, "split": split, "imgid": i, "cocoid": 1000 + i, "sentids": [],
                 "sentences": [{"raw": f"  photo {i} caption {j} ", "tokens": ["photo", str(i)], "imgid": i}
                               for j in range(6 if i == 2 else 5)]}
        if dataset == "coco":
            entry["filepath"] = folder
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / name).write_bytes(image_bytes(i, fmt="JPEG"))
        else:
            (root / "flickr30k-images").mkdir(parents=True, exist_ok=True)
            (root / "flickr30k-images" / name).write_bytes(image_bytes(i, fmt="JPEG"))
        images.append(entry)
    path = root / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"images": images, "dataset": dataset}))
    return path


def test_karpathy_split_files(tmp_path):
    coco = _karpathy(tmp_path / "coco")
    entries = retrieval.read_captions_file(coco)  # the test split by default
    assert [p.relative_to(tmp_path / "coco").as_posix() for p, _ in entries] == [
        "val2014/COCO_val2014_000000000000.jpg", "val2014/COCO_val2014_000000000002.jpg"]
    assert entries[0][1] == [f"photo 0 caption {j}" for j in range(5)] and len(entries[1][1]) == 6  # all kept
    assert retrieval.resolve_source(coco).name == "coco"
    val = retrieval.resolve_source(coco, split="val")
    assert (val.kind, len(val.items), val.name) == ("file", 1, "coco_val")
    assert len(retrieval.read_captions_file(coco, split="restval")) == 1
    with pytest.raises(ValueError, match=r"without a 'nope' split; it has restval \(1 images\), test \(2 images\)"):
        retrieval.read_captions_file(coco, split="nope")
    # Flickr30k: no filepath; --images names the folder of its jpgs
    flickr = _karpathy(tmp_path / "f30k", dataset="flickr30k")
    with pytest.raises(FileNotFoundError, match=r"2 of 2 images listed in .*dataset_flickr30k.json are not under "
                                                r".*f30k .*Point --images at"):
        retrieval.resolve_source(flickr)
    src = retrieval.resolve_source(flickr, images=tmp_path / "f30k" / "flickr30k-images")
    assert src.name == "flickr30k" and all(p.is_file() for p, _ in src.items)
    # a plain captions file has no splits; shards take neither option
    (tmp_path / "caps.tsv").write_text("coco/val2014/COCO_val2014_000000000000.jpg\ta photo\n")
    with pytest.raises(ValueError, match="applies to Karpathy split files.*drop --split"):
        retrieval.resolve_source(tmp_path / "caps.tsv", split="test")
    assert retrieval.resolve_source(tmp_path / "caps.tsv").name is None
    shards = _shards(tmp_path / "shards", n_images=2)
    with pytest.raises(ValueError, match="holds \\*.tar shards: drop them"):
        retrieval.resolve_source(shards, images=tmp_path)


def test_retrieval_command_scores_filip_models_token_wise(tmp_path, capsys, caplog):
    """A FILIP checkpoint is scored token-wise by default, the record says how and which split; --scoring
    global warns that its global embeddings never trained; a model without token heads refuses token."""
    exp, model = filip_model()
    ckpt = save_checkpoint(model, exp, tmp_path / "filip" / "step_00000001")
    coco = _karpathy(tmp_path / "coco")
    out = tmp_path / "ret.json"
    assert retrieval.main(["--checkpoint", str(ckpt), "--data", str(coco), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("coco: i2t_R@1") and "(2 images, 11 captions; token-wise scoring)" in printed
    rec = report.load_record(out)
    assert (rec["task"], rec["scoring"], rec["mask_padding"], rec["split"]) == ("retrieval", "token", True, "test")
    assert set(rec["metrics"]) == {"coco"} and rec["metrics"]["coco"]["n_texts"] == 11
    from declip_ds.data.tokenizer import Tokenizer

    direct = retrieval.evaluate_retrieval(model, Tokenizer(context_length=16), coco, image_size=32, scoring="token",
                                          crop_ratio=exp.eval.crop_ratio, interpolation=exp.eval.interpolation)
    assert rec["metrics"]["coco"] == pytest.approx(direct)
    with caplog.at_level(logging.WARNING):
        assert retrieval.main(["--checkpoint", str(ckpt), "--data", str(coco), "--split", "val", "--scoring", "global",
                               "--out", str(tmp_path / "g.json")]) == 0
    assert "global embeddings got no gradient" in caplog.text
    rec = report.load_record(tmp_path / "g.json")
    assert (rec["scoring"], set(rec["metrics"]), "mask_padding" in rec) == ("global", {"coco_val"}, False)
    assert retrieval.main(["--checkpoint", str(ckpt), "--data", str(coco), "--mask-padding", "false",
                           "--out", str(tmp_path / "all.json")]) == 0
    assert "token-wise scoring, all positions" in capsys.readouterr().out
    assert report.load_record(tmp_path / "all.json")["mask_padding"] is False
    from tests.test_eval_suite import tiny_model

    exp0, model0 = tiny_model()
    plain = save_checkpoint(model0, exp0, tmp_path / "clip" / "step_00000001")
    assert retrieval.main(["--checkpoint", str(plain), "--data", str(coco), "--scoring", "token"]) == 2
    assert "needs a FILIP-family model with token projections" in capsys.readouterr().err


def test_suite_retrieval_task(tmp_path, capsys):
    """--task retrieval evaluates the suite's retrieval datasets (Karpathy files or webdataset copies), with
    the checkpoint's preprocessing and scoring; a missing one is skipped with what to get where; tasks and
    suites that share no dataset are refused."""
    from declip_ds.data.tokenizer import Tokenizer
    from declip_ds.eval import downstream as D
    from declip_ds.eval import suite
    from declip_ds.models.pretrained import load_for_eval

    exp, model = filip_model()
    ckpt = save_checkpoint(model, exp, tmp_path / "run" / "step_00000001")
    root = tmp_path / "data"
    _karpathy(root / "coco")
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--data-root", str(root), "--workers", "0", "--out", str(out)]
    assert suite.main([*args, "--suite", "retrieval", "--task", "retrieval"]) == 0
    rec = report.load_record(out / "retrieval.json")
    assert (rec["task"], rec["datasets"], rec["scoring"], rec["mask_padding"]) == (
        "retrieval", ["flickr30k", "coco"], "token", True)
    assert "dataset_flickr30k.json" in rec["skipped"]["flickr30k"] and "caption_datasets.zip" in rec["skipped"]["flickr30k"]
    coco = rec["metrics"]["coco"]
    assert (coco["headline_metric"], coco["n"], coco["n_texts"], coco["layout"]) == ("mean_recall", 2, 11, "karpathy")
    em = load_for_eval(ckpt)
    direct = retrieval.evaluate_retrieval(em.model, Tokenizer(context_length=16), root / "coco" / "dataset_coco.json",
                                          transform=em.transform(), scoring="token")
    assert {k: coco[k] for k in direct} == pytest.approx(direct)
    table = (out / "table.txt").read_text()
    assert "retrieval mean recall (%)" in table and "flickr30k" in table
    # a webdataset copy of the test split; --scoring global is recorded as such
    _shards(root / "flickr30k_wds" / "test", n_images=4)
    assert suite.main([*args, "--suite", "flickr30k,coco", "--task", "retrieval", "--scoring", "global"]) == 0
    rec = report.load_record(out / "retrieval.json")
    assert rec["skipped"] == {} and rec["scoring"] == "global" and "mask_padding" not in rec
    assert (rec["metrics"]["flickr30k"]["layout"], rec["metrics"]["flickr30k"]["n"]) == ("shards", 4)
    # all = the classification tasks over classification datasets, retrieval over retrieval ones
    assert D.suite_datasets("coco,CIFAR10") == ["coco", "cifar10"] and D.suite_datasets("all")[-2:] == ["flickr30k", "coco"]
    capsys.readouterr()
    assert suite.main([*args, "--suite", "declip11", "--task", "retrieval"]) == 2
    assert "Suite 'declip11' has no retrieval dataset for --task retrieval (try --suite retrieval)" in capsys.readouterr().err
    assert suite.main([*args, "--suite", "retrieval", "--task", "both"]) == 2
    assert "no classification dataset for --task both" in capsys.readouterr().err
    assert suite.main([*args, "--suite", "coco,cifar10", "--task", "all", "--templates", "simple"]) == 0
    recs = {t: report.load_record(out / f"{t}.json") for t in ("zeroshot", "linear_probe", "retrieval")}
    assert [r["datasets"] for r in recs.values()] == [["cifar10"], ["cifar10"], ["coco"]]
    assert "cifar10" in recs["zeroshot"]["skipped"] and recs["retrieval"]["skipped"] == {}
    with pytest.raises(ValueError, match="'coco' is a retrieval dataset"):
        D.get_spec("coco")


def test_training_retrieval_sources_are_checked_before_training(tmp_path):
    """eval.retrieval: a missing path or a Karpathy file without a test split fails at start, naming the key."""
    from declip_ds.config import ConfigError, from_dict
    from declip_ds.train.engine import check_eval

    coco = _karpathy(tmp_path / "coco")
    exp = from_dict({**TINY, "eval": {"retrieval": [str(coco), str(tmp_path / "nope")]}})
    with pytest.raises(ConfigError, match=r"eval.retrieval\[1\]: Retrieval data '.*nope' does not exist.*drop it"):
        check_eval(exp)
    data = json.loads(coco.read_text())
    for d in data["images"]:
        d["split"] = "val" if d["split"] == "test" else d["split"]
    coco.write_text(json.dumps(data))
    exp = from_dict({**TINY, "eval": {"retrieval": [str(coco)]}})
    with pytest.raises(ConfigError, match=r"eval.retrieval\[0\]: .* without a 'test' split"):
        check_eval(exp)
    check_eval(from_dict({**TINY, "eval": {"retrieval": [str(_shards(tmp_path / "s", n_images=2))]}}))
