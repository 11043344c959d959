"""A byte-level tokenizer with the corpus.tokenizer interface, and writers of small files in every layout."""
from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

SLIM_SETS = {"arxiv": "RedPajamaArXiv", "book": "RedPajamaBook", "c4": "RedPajamaC4",
             "common_crawl": "RedPajamaCommonCrawl", "github": "RedPajamaGithub",
             "stackexchange": "RedPajamaStackExchange", "wikipedia": "RedPajamaWikipedia"}


class ByteTokenizer:
    """id = byte + offset; 0 pad, 1 bos, 2 eos. `offset` past 65,533 makes a vocabulary that needs uint32."""

    def __init__(self, offset: int = 3, bad_after: int | None = None):
        self.offset, self.bad_after = offset, bad_after
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = offset + 256
        self.source = f"bytes+{offset}" if bad_after is None else f"bytes+{offset}-bad{bad_after}"

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode()]

    def encode_batch(self, texts):
        out = [self.encode(t) for t in texts]
        if self.bad_after is not None:  # a broken tokenizer: ids past the vocabulary after some text
            out = [[i if k < self.bad_after else self.vocab_size + 7 for k, i in enumerate(ids)] for ids in out]
        return out

    def decode(self, ids) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode(errors="replace")


class CrashingTokenizer(ByteTokenizer):
    """Raises (like a killed process) on its `crash_at`-th call to encode_batch in this process."""

    def __init__(self, crash_at: int):
        super().__init__()
        self.crash_at, self.calls = crash_at, 0

    def encode_batch(self, texts):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        return super().encode_batch(texts)


def words(rng: random.Random, n: int) -> str:
    vocab = ["alpha", "beta", "gamma", "delta", "data", "token", "llama", "pack", "shard", "mix", "zeta", "\n"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def docs(seed: int, n: int, lo: int = 3, hi: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [f"doc{seed}-{i} " + words(rng, rng.randint(lo, hi)) for i in range(n)]


def write_jsonl(path: Path, records, compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    if compress:
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=16)
    return path


def redpajama(root: Path, per_slice: int = 12) -> Path:
    """RedPajama-Data-1T: a folder per slice of jsonl; common_crawl as .jsonl.zst in a dated subfolder."""
    for k, sl in enumerate(("arxiv", "book", "c4", "common_crawl", "github", "stackexchange", "wikipedia")):
        recs = [{"text": t, "meta": {"source": sl}} for t in docs(100 + k, per_slice)]
        if sl == "common_crawl":
            write_jsonl(root / sl / "2019-30" / "en_head_0000.json.gz.dedup.classifier.jsonl.zst", recs, True)
        else:
            write_jsonl(root / sl / f"{sl}_0.jsonl", recs)
    (root / "urls").mkdir(parents=True, exist_ok=True)
    (root / "urls" / "arxiv.txt").write_text("https://example.invalid/arxiv_0.jsonl\n")  # never data
    return root


def redpajama_sample(root: Path, per_file: int = 10) -> Path:
    """RedPajama-Data-1T-Sample: files at the top, the slice in the file name."""
    for k, stem in enumerate(("arxiv_0a1b", "book_2c3d", "c4-train.00000-of-01024", "cc_2019-30_4e5f",
                              "github_6a7b", "stackexchange_8c9d", "wikipedia_0e1f")):
        write_jsonl(root / f"{stem}.jsonl", [{"text": t, "meta": "{}"} for t in docs(200 + k, per_file)])
    return root


def slimpajama(root: Path, chunks: int = 2, per_file: int = 30, seed: int = 0) -> Path:
    """SlimPajama-627B: train/validation/test of chunk*/ *.jsonl.zst with meta.redpajama_set_name."""
    rng = random.Random(seed)
    for split, n in (("train", chunks), ("validation", 1), ("test", 1)):
        for c in range(1, n + 1):
            for j in range(2):
                texts = docs(zlib.crc32(f"{split}{c}{j}".encode()) % 10_000 + seed, per_file)
                recs = [{"text": t, "meta": {"redpajama_set_name": SLIM_SETS[rng.choice(list(SLIM_SETS))]}}
                        for t in texts]
                name = f"example_{'train' if split == 'train' else 'holdout'}_{j}.jsonl.zst"
                write_jsonl(root / split / f"chunk{c}" / name, recs, compress=True)
    return root


def starcoder(root: Path, per_lang: int = 20) -> Path:
    """StarCoder data: a folder per language of parquet with a `content` column."""
    for k, lang in enumerate(("python", "javascript", "c")):
        texts = [f"# {lang} file {i}\ndef f{i}(x):\n    return x + {i}\n" * (1 + i % 3) for i in range(per_lang)]
        write_parquet(root / lang / "train-00000-of-00001.parquet",
                      {"content": texts, "max_stars_repo_path": [f"r/{i}.py" for i in range(per_lang)]})
    return root


def text_folder(root: Path, n: int = 8) -> Path:
    for i, t in enumerate(docs(300, n, 20, 60)):
        (root / f"part{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"part{i % 2}" / f"doc{i}.txt").write_text(t)
    return root
